"""The report logged to a run's W&B run (when its recipe configures W&B): each chart as a wandb.Image under
`report/<chart>` (the merges' chart is `report/merges`), and the run's merge fidelity reports as one
wandb.Table `report/merge_reports`.

The W&B run is the training run itself (its id is in RUN/wandb_run_id), resumed; an offline run gets a new
offline directory with the same id, which `wandb sync` appends to the training run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from finetune.report.plots import render_all
from finetune.report.runs import Run

MERGE_COLUMNS = ["output", "format", "merge_into", "loss_base", "loss_adapter", "loss_merged", "kl_adapter_merged",
                 "retention", "merge_seconds", "output_bytes", "reward_accuracy_adapter", "reward_accuracy_merged"]


def wandb_settings(run: Run) -> dict | None:
    wb = ((run.recipe.get("tracking") or {}).get("wandb")) or {}
    if not wb.get("project") or wb.get("mode") == "disabled":
        return None
    return wb


def merge_rows(run: Run) -> list[list]:
    rows = []
    for m in run.merges:
        f = m.fidelity or {}
        rows.append([str(m.path), m.label, m.report.get("merge_into"), f.get("loss_base"), f.get("loss_adapter"),
                     f.get("loss_merged"), f.get("kl_adapter_merged"), f.get("retention"),
                     m.report.get("merge_seconds"), m.report.get("output_bytes"), f.get("reward_accuracy_adapter"),
                     f.get("reward_accuracy_merged")])
    return rows


def log_report(run: Run, smooth: float) -> str | None:
    """Log this run's own charts (not the overlay of every run) and merge table; returns the W&B run id."""
    wb = wandb_settings(run)
    if wb is None:
        return None
    import wandb

    id_file = run.path / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run_dir = Path(wb.get("dir") or run.path)
    wrun = wandb.init(project=wb["project"], entity=wb.get("entity"), name=wb.get("name"), mode=wb.get("mode"),
                      dir=str(run_dir), id=run_id, resume="allow" if run_id else None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            plots = render_all([run], Path(tmp), smooth)
            payload = {f"report/{p.name}": wandb.Image(str(p.path), caption=p.title) for p in plots}
            if run.merges:
                payload["report/merge_reports"] = wandb.Table(columns=MERGE_COLUMNS, data=merge_rows(run))
            wrun.log(payload)
        return wrun.id
    finally:
        wrun.finish()
