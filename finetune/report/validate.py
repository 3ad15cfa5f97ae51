"""The files of a run directory read as data: every field the report uses has the type it uses it as.

A run directory comes from `finetune sft`, but it may have been edited, damaged or handed over, and the report
is where its files are read by code that formats numbers and walks mappings. So:
- metrics.jsonl: a line that is not a JSON object with an integer step (0..10^12) is skipped and counted (the
  report says how many); a metric that is not a finite number is dropped from its row and counted with them;
- data_report.json, merge_report.json and the recipe's sections: a field of the wrong type is one UserError
  naming the file and the field (`finetune report` exits 2), never a TypeError while the page is drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from quant.errors import UserError

# The metrics the charts draw: numbers, finite.
_PREFERENCE = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "kl")  # DPO, ORPO, KTO
METRICS = ("loss", "eval_loss", "eval_ppl", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb", "tokens", "epoch",
           *_PREFERENCE, *(f"eval_{name}" for name in _PREFERENCE))
MAX_STEP = 10**12
_NUMBER = (int, float)
RECIPE_SECTIONS = ("base", "lora", "data", "train", "preference", "output", "tracking", "samples")


def _number(value) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: Path, max_bytes: int = 2**30) -> tuple[list[dict], int]:
    """The rows of metrics.jsonl and how many lines and values were skipped (see the module docstring)."""
    if path.stat().st_size > max_bytes:
        raise UserError(f"{path}: {path.stat().st_size:,} bytes; a run's metrics are far smaller")
    rows, skipped = [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                skipped += 1
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
                skipped += 1
                continue
            bad = [k for k in METRICS if k in row and not _number(row[k])]
            skipped += len(bad)
            rows.append({k: v for k, v in row.items() if k not in bad})
    return rows, skipped


def _expect(value, kind, path: Path, field: str, what: str) -> None:
    if value is not None and not (isinstance(value, kind) and not isinstance(value, bool) or
                                  kind is bool and isinstance(value, bool)):
        raise UserError(f"{path}: {field} = {json.dumps(value, default=str)[:60]} is not valid (expected {what})")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{path}: {field} = {value} is not valid (expected a finite number)")


def _counts(value, path: Path, field: str) -> None:
    _expect(value, dict, path, field, "a mapping of reasons to counts")
    for k, v in (value or {}).items():
        _expect(v, int, path, f"{field}.{k}", "an integer")


def check_data_report(data: dict | None, path: Path) -> dict | None:
    """data_report.json with the fields the report's data table reads."""
    if data is None:
        return None
    for key in ("format", "format_reason", "rendering", "eval_from"):
        _expect(data.get(key), str, path, key, "text")
    _expect(data.get("max_length"), int, path, "max_length", "an integer")
    for key in ("packing", "train_on_prompt"):
        _expect(data.get(key), bool, path, key, "true or false")
    for section, fields in (("splits", ("examples", "truncated", "tokens", "label_tokens", "sequences")),
                            ("sources", ("rows_read", "rows_kept"))):
        _expect(data.get(section), dict, path, section, "a mapping")
        for name, entry in (data.get(section) or {}).items():
            where = f"{section}.{name}"
            _expect(entry, dict, path, where, "a mapping")
            for key in fields:
                _expect((entry or {}).get(key), int, path, f"{where}.{key}", "an integer")
            _counts((entry or {}).get("dropped"), path, f"{where}.dropped")
            _expect((entry or {}).get("prompt_token_share"), _NUMBER, path, f"{where}.prompt_token_share", "a number")
            _expect((entry or {}).get("source"), str, path, f"{where}.source", "text")
    return data


def check_merge_report(data: dict | None, path: Path) -> dict | None:
    """merge_report.json with the fields the report's merge table, chart and W&B table read."""
    if data is None:
        return None
    for key in ("format", "merge_into", "adapter", "base"):
        _expect(data.get(key), str, path, key, "text")
    for key in ("merge_seconds", "output_bytes"):
        _expect(data.get(key), _NUMBER, path, key, "a number")
    fidelity = data.get("fidelity")
    _expect(fidelity, dict, path, "fidelity", "a mapping")
    for key in ("loss_base", "loss_adapter", "loss_merged", "kl_adapter_merged", "retention",
                "reward_accuracy_adapter", "reward_accuracy_merged"):
        _expect((fidelity or {}).get(key), _NUMBER, path, f"fidelity.{key}", "a number")
    encoded = data.get(data.get("format")) if isinstance(data.get("format"), str) else None
    if isinstance(encoded, dict):
        for key in ("bits", "group_size"):
            _expect(encoded.get(key), int, path, f"{data['format']}.{key}", "an integer")
        _expect(encoded.get("method"), str, path, f"{data['format']}.method", "text")
    return data


def check_recipe(data, path: Path) -> dict:
    """A run's recipe.yaml: a mapping whose sections are mappings (the report reads keys in them)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a recipe mapping")
    for section in RECIPE_SECTIONS:
        _expect(data.get(section), dict, path, section, "a mapping")
    tracking = data.get("tracking") or {}
    _expect(tracking.get("wandb"), dict, path, "tracking.wandb", "a mapping")
    for key in ("project", "entity", "name", "mode", "dir"):
        _expect((tracking.get("wandb") or {}).get(key), str, path, f"tracking.wandb.{key}", "text")
    return data
