"""Reading rows: JSON lines, JSON arrays (including truncated ones), parquet/csv through `datasets`, and errors."""

import json

import pandas as pd
import pytest

from finetune.data import read_rows
from quant.errors import UserError


def test_jsonl_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "extra": 1}\n')
    rows = read_rows(str(path))
    assert [r["text"] for r in rows] == ["one", "two"]
    assert rows.columns == ["text", "extra"]
    assert rows.where(1) == f"{path}: row 1 (line 3)"


def test_jsonl_bad_line_names_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"a\.jsonl' line 2 is not valid JSON"):
        read_rows(str(path))


def test_max_examples_caps_rows_read(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(10)) + "not json\n")
    assert len(read_rows(str(path), max_examples=3)) == 3  # never reaches the bad last line


def test_json_array_split_mapping_and_json_lines_in_a_json_file(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [r["text"] for r in read_rows(str(arr))] == ["a", "b"]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": [{"text": "t"}], "test": [{"text": "e"}]}))
    assert [r["text"] for r in read_rows(str(splits), split="test")] == ["e"]
    with pytest.raises(UserError, match="no split 'dev'.*'train', 'test'"):
        read_rows(str(splits), split="dev")
    # Eval sources fall back from 'validation' to 'test'.
    assert [r["text"] for r in read_rows(str(splits), "validation", split_fallbacks=("test",))] == ["e"]
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert len(read_rows(str(lines))) == 2


def test_truncated_json_array_recovers_complete_items(tmp_path, caplog):
    path = tmp_path / "cut.json"
    full = json.dumps([{"text": f"row {i}", "n": [1, 2, 3]} for i in range(5)], indent=2)
    path.write_text(full[: full.index('"row 4"') + 4])  # cut inside the last item's string
    rows = read_rows(str(path))
    assert [r["text"] for r in rows] == [f"row {i}" for i in range(4)]
    assert "truncated JSON array: recovered 4 complete items" in rows.notes[0]
    assert "truncated" in caplog.text


def test_damaged_json_array_is_an_error_not_a_truncation(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"text": "a"}, {"text": nope}, {"text": "c"}]')
    with pytest.raises(UserError, match=r"bad\.json' is not valid JSON at line 1"):
        read_rows(str(path))


def test_parquet_and_csv_go_through_datasets(tmp_path):
    frame = pd.DataFrame({"prompt": ["2+2=", "3+3="], "completion": [" 4", " 6"]})
    frame.to_parquet(tmp_path / "a.parquet")
    frame.to_csv(tmp_path / "a.csv", index=False)
    for name in ("a.parquet", "a.csv"):
        rows = read_rows(str(tmp_path / name), max_examples=1)
        assert rows.columns == ["prompt", "completion"]
        assert list(rows) == [{"prompt": "2+2=", "completion": " 4"}]


@pytest.mark.parametrize("name", ["notes.txt", "table.xlsx", "noext"])
def test_unsupported_file_type_is_a_user_error(tmp_path, name):
    path = tmp_path / name
    path.write_text("hello")
    with pytest.raises(UserError, match=r"data\.train: .* has unsupported file type .*use \.jsonl, \.json"):
        read_rows(str(path))


def test_missing_or_unreadable_file_names_the_path(tmp_path):
    with pytest.raises(UserError, match=r"data\.eval: file '.*missing\.jsonl' not found"):
        read_rows(str(tmp_path / "missing.jsonl"), what="data.eval")
    with pytest.raises(UserError, match="neither an existing file"):
        read_rows("no such thing")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match=r"bin\.jsonl' is not UTF-8"):
        read_rows(str(binary))


def test_unreachable_hub_dataset_is_a_user_error(monkeypatch):
    import datasets
    import huggingface_hub

    # Offline mode makes the lookup fail at once instead of retrying the network for ~25 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"data\.train: cannot read 'someorg/no-such-dataset'"):
        read_rows("someorg/no-such-dataset")
