"""Settings dataclasses whose fields are also command-line flags, so that a default, its help, its choices and
the rule it must meet are written once, on the field: `quant gptq` / `quant awq` generate their quantizer flags
from GPTQConfig / AWQConfig, and `finetune merge` its per-format options from each format's `options` dataclass
(quant.formats.base.option).

A field made by `setting(...)` with a help text is a flag: `--name-with-dashes` (or `flag`), a bool field
`--x/--no-x`, its help followed by the field's default. Every flag defaults to None on the command line, so a value
not given falls to the dataclass's own default (`from_flags`): no default is written twice. `check(obj)` applies
the fields' choices and rules and raises one UserError line naming the first value that breaks them.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

from quant.errors import UserError


def setting(default, help: str | None = None, *, type: type | None = None, choices: tuple | None = None,
            flag: str | None = None, valid: Callable[[object], bool] | None = None, rule: str = ""):
    """A dataclass field with what its flag needs: `help` (None: not a flag), `type` (default: the default's),
    `choices`, `flag` (default: --field-name). `valid(value)` is the field's rule and `rule` its message, a format
    string of `value` ("bits must be one of 2, 3, 4, 8 (got {value})")."""
    meta = {"help": help, "type": type or _type_of(default), "choices": choices, "flag": flag, "valid": valid,
            "rule": rule}
    return dataclasses.field(default=default, metadata=meta)


def _type_of(value) -> type:
    return str if value is None else value.__class__


def check(obj) -> None:
    """Refuse, in one line, the first field of `obj` outside its choices or breaking its rule."""
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        choices = meta.get("choices")
        if choices and value is not None and value not in choices:
            raise UserError(f"{f.name.replace('_', ' ')} must be one of {', '.join(map(str, choices))} (got {value!r})")
        valid = meta.get("valid")
        if valid is not None and not valid(value):
            raise UserError(meta["rule"].format(value=value))


def flags(cls) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line flags."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("help")]


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per flag field of `cls`, in field order; each defaults to None (the dataclass's default)."""
    for f in flags(cls):
        meta = f.metadata
        shown = f.default if f.default is not dataclasses.MISSING else None
        help = meta["help"] if shown is None else f"{meta['help']} (default: {_shown(shown)})"
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kwargs = {"dest": f.name, "default": None, "help": help}
        if meta["type"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=meta["type"], choices=meta["choices"],
                          metavar=None if meta["choices"] else flag.lstrip("-").replace("-", "_").upper())
        parser.add_argument(flag, **kwargs)


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def from_flags(cls, args: argparse.Namespace):
    """`cls` from parsed arguments: each flag given, the dataclass's default for the others."""
    return cls(**{f.name: getattr(args, f.name) for f in flags(cls) if getattr(args, f.name, None) is not None})
