"""What the `finetune` command prints besides its results: the --version line, the recipe keys in `sft --help`
(from the typed Recipe, so they never drift from it), one prefix for warnings and errors, and library lines a user
cannot act on kept off the console."""

from __future__ import annotations

import dataclasses
import logging
import os
import textwrap
import typing
from importlib import metadata

from finetune import __version__
from finetune.recipe import Recipe


def recipe_keys_help(width: int = 110) -> str:
    """Every recipe key with its values and default, one section per paragraph (from the typed Recipe)."""

    def values(tp) -> str:
        args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Literal:
            return "|".join(map(str, args))
        if typing.get_origin(tp) is list:
            return f"list of {values(args[0])}"
        if args:
            return " or ".join(values(a) for a in args if a is not type(None)) + (
                " or null" if type(None) in args else "")
        return {int: "int", float: "number", bool: "true|false", str: "text"}.get(tp, getattr(tp, "__name__", "?"))

    def default(f) -> str:
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value == "" and f.name in ("model", "train"):
            return "required"
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    lines = []
    for section in dataclasses.fields(Recipe):
        tp = typing.get_type_hints(Recipe)[section.name]
        if not dataclasses.is_dataclass(tp):
            continue
        hints = typing.get_type_hints(tp)
        entries = []
        for f in dataclasses.fields(tp):
            if dataclasses.is_dataclass(hints[f.name]):  # tracking.wandb
                sub = typing.get_type_hints(hints[f.name])
                entries += [f"{f.name}.{g.name} ({values(sub[g.name])}; {default(g)})"
                            for g in dataclasses.fields(hints[f.name])]
            else:
                entries.append(f"{f.name} ({values(hints[f.name])}; {default(f)})")
        lines.append(textwrap.fill(f"{section.name}: " + ", ".join(entries), width, initial_indent="  ",
                                   subsequent_indent="      ", break_on_hyphens=False))
    return "\n".join(lines)


def version_line() -> str:
    """Ours and the libraries a bug report needs, read from the installed metadata (nothing is imported)."""
    libs = []
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            libs.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            libs.append(f"{name} not installed")
    return f"finetune (qlora-finetune) {__version__}; {', '.join(libs)}"


class Prefixed(logging.Formatter):
    """Our lines as they are; warnings and errors start with 'warning: ' / 'error: ', as the CLI's own do."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            prefix = "error: " if record.levelno >= logging.ERROR else "warning: "
            return text if text.lower().startswith(prefix) else prefix + text
        return text


def quiet_libraries() -> None:
    """What a user cannot act on stays off the console: transformers' per-tensor "Loading weights" bars (our own
    bars show the long steps), and bitsandbytes' advice to install a hub kernel for a CPU path our layers never
    take (quant/formats/bnb.py). Set before those libraries are imported; a user's own setting wins."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
