"""The checks of recipe values that a type annotation and a range cannot state, and the strict YAML loader.

Used from field metadata in finetune/recipe.py (`check=`); each raises RecipeError naming the file and key.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path

import yaml

from quant.errors import UserError


class RecipeError(UserError):
    """A recipe problem; the message is one line naming the key."""


def short(value) -> str:
    """repr for an error message: bounded in length and depth (values can be huge or nested 5,000 deep)."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlevel, r.maxlist, r.maxdict = 80, 80, 3, 6, 4
    return r.repr(value)


def path_or_id(value: str, where: str, source: str) -> None:
    """A file path or hub id the OS can be asked about: no NUL, no over-long name, a resolvable `~user`."""
    if len(value) > 4096 or any(len(part) > 255 for part in value.split("/")):
        raise RecipeError(f"{source}: {where} = {short(value)} is too long to be a path or a hub id")
    try:
        Path(value).expanduser()
    except RuntimeError:
        raise RecipeError(f"{source}: {where} = {value!r}: cannot expand '~' (no such user)") from None


def target_modules(value, where: str, source: str) -> None:
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"{source}: {where} is an empty list (use 'all-linear' or module names)")
        empty = [i for i, name in enumerate(value) if not name.strip()]
        if empty:
            raise RecipeError(f"{source}: {where}[{empty[0]}] is an empty module name "
                              "(use 'all-linear' or names like q_proj)")
        return
    if value == "all-linear":
        return
    if not value.strip():
        raise RecipeError(f"{source}: {where} = {value!r} is empty (use 'all-linear', a list of module names, "
                          "or a regex over module paths)")
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as e:
        raise RecipeError(f"{source}: {where} = {short(value)} is neither 'all-linear' nor a valid regular "
                          f"expression ({e}); use 'all-linear', a list like [q_proj, v_proj], or a regex such "
                          r"as '.*\.(q|v)_proj'") from None


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from "\ud800" in the YAML
        return False
    return True



class DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would silently keep the last one: a
    second `train:` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKey(f"duplicate key {short(key)} at line {line} (first at line {seen[key]}); "
                                        "a repeated key or section would silently replace the first")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
