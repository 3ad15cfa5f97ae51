"""Where metrics go: the console, `metrics.jsonl` in the output directory, and Weights & Biases.

Only the main process tracks; the loop hands it already-reduced numbers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from finetune.recipe import Recipe
from finetune.train.diskspace import disk_space_guard
from finetune.train.optional import wandb
from quant.files import write_text
class Tracker:
    def __init__(self, recipe: Recipe, out_dir: Path, resume_step: int | None, enabled: bool = True):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.metrics_path.unlink(missing_ok=True)
        else:
            self._truncate_after(resume_step)
        wb = recipe.tracking.wandb
        if wb.project and wb.mode != "disabled":
            self.wandb_run = self._start_wandb(recipe, resume=resume_step is not None)

    def _truncate_after(self, step: int) -> None:
        """Drop lines a crashed run logged past the checkpoint we resume from, so each step appears once, and
        a line torn by a kill mid-write. The file is replaced whole, never rewritten in place."""
        if not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text(errors="replace").splitlines()
                if (record := _record(line)) is not None and record.get("step", 0) <= step]
        write_text(self.metrics_path, "".join(line + "\n" for line in keep))  # a crash here loses no line

    def _start_wandb(self, recipe: Recipe, resume: bool):
        wb = recipe.tracking.wandb
        id_file = self.out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        run_dir = Path(wb.dir or self.out_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        run = wandb().init(
            project=wb.project,
            name=wb.name,
            entity=wb.entity,
            mode=wb.mode,
            dir=str(run_dir),
            config=recipe.to_dict(),
            id=run_id,
            resume="allow" if run_id else None,
        )
        write_text(id_file, run.id)
        return run

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        with disk_space_guard(self.metrics_path, len(line)), open(self.metrics_path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)

    def summary(self, values: dict) -> None:
        if self.enabled and self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = _clean(v)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _record(line: str) -> dict | None:
    """A metrics line as a dict, or None for a torn or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step", 0), int) else None


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_metrics(metrics: dict) -> str:
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)
