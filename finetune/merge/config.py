"""`finetune merge`'s typed config, validated once: the one place its errors are worded (each names the flag or
key and what is valid). The CLI builds it from argparse; Python callers build it directly:

    MergeConfig(adapter="runs/quickstart", out="merged/qs-gptq", format="gptq", calib=["data/train.jsonl"],
                options={"group_size": 64})

`options` are the output format's own settings (quant.formats: a format's `options` dataclass; on the command
line each is a flag, `group_size` -> `--group-size`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quant.errors import UserError
from quant.tensorfiles import DEFAULT_SHARD_BYTES
from quant.formats.base import DTYPES, REQUIRED, Format
from quant.formats.registry import FORMATS, output_format

MERGE_INTO = ("auto", "dequantized", "original")
_FLAGS = {"adapter": "ADAPTER_OR_RUN_DIR", "eval_data": "--eval", "report": "--no-report"}
_MINIMUM = {"calib_samples": 1, "calib_seqlen": 2, "eval_max_batches": 1, "max_shard_bytes": 1}


def flag(name: str) -> str:
    """The command-line spelling of a config field or format option."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def format_options() -> dict[str, tuple[dict, list[str]]]:
    """Every output format's options by name: (the field's metadata, the formats that take it). Formats that share
    an option name share its meaning (and its flag)."""
    found: dict[str, tuple[dict, list[str]]] = {}
    for fmt in FORMATS:
        if fmt.output and fmt.options is not None:
            for f in dataclasses.fields(fmt.options):
                meta, taking = found.setdefault(f.name, (dict(f.metadata), []))
                taking.append(fmt.name)
                if meta["choices"] and f.metadata["choices"]:  # --method: gptq, rtn + awq, rtn
                    meta["choices"] = tuple(dict.fromkeys((*meta["choices"], *f.metadata["choices"])))
    return found


@dataclass
class MergeConfig:
    adapter: str | Path  # a run directory, its adapter/, or a checkpoint-N/
    out: str | Path  # the output model directory
    format: str  # an output format of quant.formats.registry
    base: str | None = None  # another copy of the base the adapter was trained on
    merge_into: str = "auto"  # auto | dequantized | original
    base_original: str | None = None  # the full-precision model a stored-quantized base was made from
    calib: Any = None  # calibration data: path/spec(s), or [1, T] token-id tensors from Python
    calib_samples: int = 128
    calib_seqlen: int = 512
    options: Any = field(default_factory=dict)  # the format's options (a dict; the format's dataclass once valid)
    eval_data: str | None = None  # fidelity report data (default: the run's data.eval)
    eval_max_batches: int | None = None
    report: bool = True
    dtype: str | None = None  # dtype of unquantized tensors; default: the format's
    device: str | None = None  # default: cuda when available
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    progress: bool = True

    @property
    def fmt(self) -> Format:
        return output_format(self.format, flag("format"))

    @property
    def out_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype] if self.dtype else self.fmt.default_dtype

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def validate(self) -> "MergeConfig":
        """Check every field, normalise calib to a list and options to the format's dataclass; returns self."""
        fmt = self.fmt
        if self.merge_into not in MERGE_INTO:
            raise UserError(f"--merge-into must be one of {', '.join(MERGE_INTO)} (got {self.merge_into!r})")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.dtype is not None and fmt.fixed_dtype:
            raise UserError(f"--dtype applies to quantized formats; --format {fmt.name} already fixes the dtype")
        for name, low in _MINIMUM.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise UserError(f"{flag(name)} must be an integer >= {low} (got {value!r})")
        try:
            torch.device(self.device) if self.device else None
        except (RuntimeError, ValueError):
            raise UserError(f"--device must be cpu, cuda or cuda:N (got {self.device!r})") from None
        self.adapter, self.out = Path(self.adapter), Path(self.out)
        if isinstance(self.calib, (str, Path, torch.Tensor)):
            self.calib = [self.calib]
        self.calib = list(self.calib) if self.calib else None
        self.options = self._format_options(fmt)
        if self.calib and not fmt.accepts_calibration():
            raise UserError(f"--calib applies to --format {self._taking(lambda f: f.accepts_calibration())} only")
        if self.calib and fmt.calibration(self.options) is None:  # e.g. gguf Q8_0, gptq --method rtn
            logging.getLogger("finetune.merge").warning(
                "--calib has no effect on --format %s with these settings (nothing is searched); ignoring it", fmt.name)
            self.calib = None
        if fmt.calibration(self.options) == REQUIRED and not self.calib:
            raise UserError(f"--format {fmt.name} needs calibration data: pass --calib DATA (text/jsonl/parquet "
                            f"file, directory or pkg:...), e.g. the training data{fmt.calib_hint}")
        return self

    def _format_options(self, fmt: Format):
        given = self.options if isinstance(self.options, dict) else dataclasses.asdict(self.options)
        given = {k: v for k, v in given.items() if v is not None}
        known = format_options()
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise UserError(f"options: unknown {unknown}; format options are {', '.join(sorted(known))}")
        names = {f.name for f in dataclasses.fields(fmt.options)} if fmt.options else set()
        misplaced = [k for k in given if k not in names]
        if misplaced:
            flags = "/".join(flag(k) for k in misplaced)
            taking = self._taking(lambda f: f.options is not None and
                                  any(k in {x.name for x in dataclasses.fields(f.options)} for k in misplaced))
            raise UserError(f"{flags} {'applies' if len(misplaced) == 1 else 'apply'} to --format {taking} only")
        own = {f.name: f.metadata for f in dataclasses.fields(fmt.options)} if fmt.options else {}
        for key, value in given.items():
            _check_option(key, value, own[key])  # this format's choices (--method awq is not a gptq method)
        return fmt.options(**given) if fmt.options else None

    @staticmethod
    def _taking(test) -> str:
        return ", ".join(f.name for f in FORMATS if f.output and test(f))


def _check_option(key: str, value, meta: dict) -> None:
    kind = meta.get("type", str)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{flag(key)} = {value!r} is not valid (expected {kind.__name__})")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise UserError(f"{flag(key)} must be one of {', '.join(map(str, choices))} (got {value!r})")
