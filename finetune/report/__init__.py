"""`finetune report`: one self-contained HTML page (and the PNGs) from one or more run directories.

    from finetune.report import report
    result = report(["runs/a", "runs/b"], out="reports/ab")   # reports/ab/report.html + *.png

Modules: `runs` (read what a run directory records, find its merges), `plots` (matplotlib, headless),
`page` (the HTML), `tracking` (the plots and merge reports logged to the runs' W&B runs).
"""

from finetune.report.build import ReportResult, report

__all__ = ["ReportResult", "report"]
