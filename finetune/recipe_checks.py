"""The checks of recipe values that a type annotation and a range cannot state, and the strict YAML loader.

Used from field metadata in finetune/recipe.py (`check=`); each raises RecipeError naming the file and key.

Every YAML file the tool reads (a recipe, a run's recipe.yaml in `report`, `merge`, `--resume`) goes through
`read_yaml` / `parse_yaml`: a SafeLoader that refuses duplicate keys, and documents whose aliases expand to
more than `MAX_NODES` nodes. YAML aliases share one node, so a 300-byte "billion laughs" recipe loads at once
into shared Python lists, and only hangs later, in whatever walks it (`finetune report A B` flattened one to
compare recipes and never finished); the composed node graph is measured, expansion counted, before any object
is built. Anchors and merge keys (`<<: *defaults`) within that bound keep working.
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



MAX_NODES = 100_000  # nodes after alias expansion; a full recipe has ~100
MAX_BYTES = 16 * 2**20  # a recipe is a few KB


class DuplicateKey(Exception):
    pass


class TooLarge(Exception):
    """Aliases that expand without bound (or refer to themselves)."""


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root) -> None:
    """Count the nodes of `root` with every alias expanded (memoised per shared node, iteratively: no recursion
    limit); refuse more than MAX_NODES, and an alias inside its own anchor."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_NODES:
                raise TooLarge(f"its aliases expand to more than {MAX_NODES:,} values (an alias bomb?)")
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise TooLarge(f"an alias refers to itself (line {node.start_mark.line + 1})")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would silently keep the last one: a
    second `train:` section would replace the first), and aliases that expand without bound."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

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
    """The document in `text`; raises DuplicateKey, TooLarge, yaml.YAMLError or RecursionError."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def parse_text(text: str, source: str, what: str = "a recipe"):
    """`parse_yaml` with every failure one RecipeError line naming `source`."""
    try:
        return parse_yaml(text)
    except (DuplicateKey, TooLarge) as e:
        raise RecipeError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line, whatever PyYAML says
        raise RecipeError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply to be {what} (sections hold keys and values)") from None


def read_yaml(path: str | Path, what: str = "a recipe"):
    """The YAML file at `path` (a recipe, a run's recipe.yaml), read as `parse_text` reads it: bounded in size
    and expansion, one RecipeError line for anything else."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise RecipeError(f"{path}: {path.stat().st_size:,} bytes; {what} is a few KB of YAML")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    return parse_text(text, str(path), what)
