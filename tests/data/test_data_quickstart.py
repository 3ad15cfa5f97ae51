"""The committed quickstart dataset is what scripts/data/make_quickstart_data.py writes, and is well-formed."""

import json
from pathlib import Path

from finetune.data import build_datasets
from finetune.recipe import DataConfig
from scripts.data import make_quickstart_data

ROOT = Path(__file__).resolve().parents[2]
KEYS = ["item", "qty", "color", "name", "city", "due"]


def test_committed_files_are_reproducible(tmp_path):
    make_quickstart_data.main(["--out", str(tmp_path)])
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / "quickstart" / name).read_bytes(), name


def test_rows_are_chat_with_one_line_strict_json_answers(tiny_tok):
    notes = {}
    for name in ("train.jsonl", "eval.jsonl"):
        rows = [json.loads(line) for line in (ROOT / "data" / "quickstart" / name).read_text().splitlines()]
        notes[name] = {row["messages"][0]["content"] for row in rows}
        for row in rows:
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            answer = row["messages"][1]["content"]
            value = json.loads(answer)
            assert list(value) == KEYS and "\n" not in answer and isinstance(value["qty"], int)
            assert value["name"] in row["messages"][0]["content"] and value["city"] in row["messages"][0]["content"]
    assert 400 <= len(notes["train.jsonl"]) <= 800 and 60 <= len(notes["eval.jsonl"]) <= 100
    assert not notes["train.jsonl"] & notes["eval.jsonl"]
    bundle = build_datasets(DataConfig(train=str(ROOT / "data/quickstart/train.jsonl"),
                                       eval=str(ROOT / "data/quickstart/eval.jsonl"), max_length=256), tiny_tok, 0)
    assert bundle.report.sources["train"].rows_kept == len(notes["train.jsonl"])
    assert bundle.report.splits["train"].truncated == 0
