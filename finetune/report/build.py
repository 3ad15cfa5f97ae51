"""The `report` function: read the runs, draw the charts, write the page, log to W&B where configured."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from finetune.report.page import render
from finetune.report.plots import render_all
from finetune.report.runs import Run, attach_merges, read_run, unique_names
from finetune.report.tracking import log_report
from quant.errors import UserError
from quant.files import claim_output, staged
log = logging.getLogger(__name__)
PAGE = "report.html"
REPORT_DIR = "report"  # RUN/report: the default output, the one place inside a run a report may go
REPORT_KIND = "report"  # our marker's kind: a report folder is replaced by the next report without --overwrite


@dataclass
class ReportResult:
    out_dir: Path
    page: Path
    plots: list[Path]
    runs: list[Run]
    notes: list[str] = field(default_factory=list)
    wandb_runs: list[str] = field(default_factory=list)  # W&B run ids the report was logged to


def report(runs: list[str], out: str | None = None, merges: list[str] = (), smooth: float = 0.6,
           wandb: bool = True, echo=print, overwrite: bool = False) -> ReportResult:
    """Write `out`/report.html and the charts' PNGs (default `out`: the first run's report/ folder).

    The output folder is written under a temporary name and renamed into place when complete. It replaces an
    earlier report (our marker says so), anything else only with `overwrite`, and never a run, a merge, or a
    folder holding one (quant.files.claim_output)."""
    if not runs:
        raise UserError("name at least one run directory")
    if not 0 <= smooth < 1:
        raise UserError(f"--smooth {smooth}: must be in [0, 1) (0 = no smoothing)")
    records = [read_run(r) for r in runs]
    unique_names(records)
    notes = [n for r in records for n in r.notes] + attach_merges(records, list(merges))
    out_dir = Path(out) if out else records[0].path / REPORT_DIR
    inputs = [(r.path, "a run") for r in records] + [(m.path, "a merge") for r in records for m in r.merges]
    with claim_output(out_dir, overwrite, action="report", inputs=inputs + [(d, "--merges") for d in merges],
                      inside_ok=[r.path / REPORT_DIR for r in records], replaces=REPORT_KIND), \
            staged(out_dir, kind=REPORT_KIND) as tmp:  # the page and its charts appear together, or the old stays
        plots = render_all(records, tmp, smooth)
        (tmp / PAGE).write_text(render(records, plots, notes))
    for note in notes:
        echo(f"note: {note}")
    result = ReportResult(out_dir, out_dir / PAGE, [out_dir / p.path.name for p in plots], records, notes)
    if wandb:
        for run in records:
            try:
                run_id = log_report(run, smooth)
            except Exception as e:  # the page is written; tracking is best effort, as in finetune merge
                log.warning("W&B logging of the report for %s failed: %s", run.path, e)
                continue
            if run_id:
                result.wandb_runs.append(run_id)
                merges = f" and {len(run.merges)} merge reports" if run.merges else ""
                echo(f"logged the report's charts{merges} to W&B run {run_id} ({run.name})")
    echo(f"report: {result.page} ({len(plots)} charts: {', '.join(p.name for p in plots)})")
    return result
