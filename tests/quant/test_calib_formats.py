"""The two new-user errors of #23/#26: `quant gptq/awq --calib` reads the record formats the rest of the tool reads
(it asked for --text-field on a chat file), and its inputs are checked before any model loads
(tests/merge/test_merge_inputs.py: the same for `finetune merge`)."""

from __future__ import annotations

import json

import pytest
from support import error_line

from quant.calibration import load_texts
from quant.errors import UserError

ROWS = {
    "chat": {"messages": [{"role": "user", "content": "say red"}, {"role": "assistant", "content": "red"},
                          {"role": "tool", "content": "ignored"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "say red"}, {"from": "gpt", "value": "red"}]},
    "alpaca": {"instruction": "say red", "input": "", "output": "red"},
    "completion": {"prompt": "say red", "completion": "red"},
    "text": {"text": "say red\n\nred"},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_calibration_reads_every_record_format(tmp_path, fmt):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text((json.dumps(ROWS[fmt]) + "\n") * 3)
    assert load_texts(path) == ["say red\n\nred"] * 3


def test_a_named_field_must_be_there_and_unknown_records_say_what_to_pass(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(ROWS["chat"]) + "\n")
    with pytest.raises(UserError, match="no column 'body'"):
        load_texts(path, text_field="body")
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(UserError, match=r"no field 'text' and no record format .* pass --text-field NAME"):
        load_texts(path)


def test_quant_gptq_calibrates_on_a_chat_file(tiny_model_dir, tmp_path, capsys):
    from quant.cli import main

    calib = tmp_path / "chat.jsonl"
    calib.write_text("".join(json.dumps(ROWS["chat"] if i % 2 else ROWS["sharegpt"]) + "\n" for i in range(40)))
    assert main(["gptq", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--calib", str(calib),
                 "--calib-samples", "2", "--calib-seqlen", "32", "--group-size", "32", "--no-progress"]) == 0
    assert (tmp_path / "q" / "config.json").is_file()


@pytest.mark.parametrize("calib, expected", [
    ("missing.jsonl", "neither an existing path nor a hub id"),
    ("rows.jsonl", "no field 'text' and no record format"),
    ("bad.jsonl", "bad.jsonl:1: not valid JSON"),
])
def test_quant_checks_its_calibration_data_before_any_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                                  calib, expected):
    from quant.cli import main

    (tmp_path / "rows.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    (tmp_path / "bad.jsonl").write_text("{nope\n")

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the calibration data was checked")

    monkeypatch.setattr("quant.loading.materialize", no_load)
    monkeypatch.setattr("quant.loading.load_float_model", no_load)
    for command in ("gptq", "awq"):
        with pytest.raises(SystemExit) as e:
            main([command, str(tiny_model_dir), "--out", str(tmp_path / "q"), "--calib", str(tmp_path / calib)])
        assert e.value.code == 2 and expected in error_line(capsys.readouterr().err)
