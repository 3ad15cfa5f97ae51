"""The data checks the training commands run before any model loads, and the held-out split they leave in the run.

`check_data` reads the first rows of data.train and data.eval and converts them exactly as the pipeline will
(sources -> format detection -> conversion), so a wrong column, a missing field or an unreadable file is the same
one-line UserError the full pipeline raises, seconds after the command starts instead of after the base model
loaded (94 s for SmolLM2 on 2 CPU cores). Rows further down are checked when the pipeline reads them all.

`write_eval_split` writes the rows a seeded `data.eval_fraction` held out (the pipeline's own split) to
`eval_split.jsonl` in the run directory, so `finetune eval --data` and `finetune merge --eval` can score exactly
them, and a user can see what the eval loss was measured on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from quant.files import write_text

from . import split_items
from .formats import convert, resolve_format
from .preference import convert_preferences, detect_layout
from .report import SourceStats
from .sources import read_rows

PROBE_ROWS = 200  # the first rows checked; format detection looks at the first 100
EVAL_SPLITS = ("validation", "test", "train")  # as build_datasets reads an eval source
EVAL_SPLIT_FILE = "eval_split.jsonl"


def check_data(cfg, preference: bool = False) -> str:
    """Read and convert the first PROBE_ROWS rows of data.train (and data.eval) as SFT rows, or as preference rows
    (`preference`: pairs or KTO's labelled completions); raise the pipeline's UserError for anything it would
    refuse there. Returns one line saying what was checked and how long it took."""
    started = time.perf_counter()
    limit = min(PROBE_ROWS, cfg.max_examples or PROBE_ROWS)
    train = read_rows(cfg.train, cfg.split, limit, what="data.train")
    fmt = None if preference else resolve_format(cfg.format, train)[0]
    _, fmt_name = _convert(train, preference, fmt)
    checked = [f"{len(train)} of data.train"]
    if cfg.eval:
        rows = read_rows(cfg.eval, EVAL_SPLITS[0], PROBE_ROWS, what="data.eval", split_fallbacks=EVAL_SPLITS[1:])
        _convert(rows, preference, fmt)
        checked.append(f"{len(rows)} of data.eval")
    return (f"data: first rows checked ({', '.join(checked)}; format '{fmt_name}') in "
            f"{time.perf_counter() - started:.1f} s")


def held_out_rows(cfg, seed: int, preference: bool = False) -> list[dict]:
    """The source rows `data.eval_fraction` holds out, as the data pipelines split them (the same seeded pick over
    the converted rows or preference items), in file order."""
    rows = read_rows(cfg.train, cfg.split, cfg.max_examples, what="data.train")
    items, _ = _convert(rows, preference, None if preference else resolve_format(cfg.format, rows)[0])
    _, held = split_items(items, cfg.eval_fraction, seed)
    return [dict(rows.data[item.row]) for item in sorted(held, key=lambda item: item.row)]


def _convert(rows, preference: bool, fmt: str | None) -> tuple[list, str]:
    """(items, format name) as the pipeline converts `rows`: preference rows by the layout their columns give,
    SFT rows in `fmt` (resolved from data.train)."""
    if preference:
        layout, chat, _ = detect_layout(rows)
        return convert_preferences(rows, layout, chat, SourceStats(rows.source)), f"preference {layout}"
    return convert(rows, fmt, SourceStats(rows.source)), fmt


def write_eval_split(cfg, seed: int, out_dir: Path, preference: bool = False) -> Path | None:
    """eval_split.jsonl in `out_dir` when the run held out an eval_fraction (else None); written atomically."""
    if cfg.eval or not cfg.eval_fraction:
        return None
    path = Path(out_dir) / EVAL_SPLIT_FILE
    rows = held_out_rows(cfg, seed, preference)
    write_text(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
    return path
