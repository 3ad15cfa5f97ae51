"""build_datasets end to end: formats, eval splits, the report, batches, and the user errors it passes on."""

import pytest

from finetune.data import build_datasets
from quant.errors import UserError


def _rows(chat_row, n):
    return [chat_row((f"question {i} " + "hello " * (i % 5), f"answer {i} fine thanks"), system="be brief" * (i % 2))
            for i in range(n)]


def test_build_reports_what_happened(tiny_tok, write_jsonl, data_cfg, chat_row):
    rows = _rows(chat_row, 12) + [{"messages": [{"role": "user", "content": "unanswered"}]},
                                  {"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "q"},
                                                {"role": "assistant", "content": ""}]},
                                  chat_row(("q", "fine thanks " * 60))]
    bundle = build_datasets(data_cfg(write_jsonl(rows), max_length=128), tiny_tok, seed=3)
    report = bundle.report.to_dict()
    assert report["format"] == "chat" and "messages" in report["format_reason"]
    src = report["sources"]["train"]
    assert (src["rows_read"], src["rows_kept"], src["dropped"]) == (15, 13, {"no assistant turn": 2})
    assert src["unknown_roles"] == {"tool": 1} and src["turn_fixes"]["empty turns dropped"] == 1
    split = report["splits"]["train"]
    assert split["examples"] == 13 and split["truncated"] == 1 and split["sequences"] == len(bundle.train) < 13
    assert 0 < split["prompt_token_share"] < 1
    text = bundle.report.summary()
    for part in ("Data format 'chat' (auto: column 'messages'", "read 15 rows, kept 13", "2 no assistant turn",
                 "unknown roles dropped: tool 1", "1 empty turns dropped", "1 truncated at 128 tokens",
                 "prompt-token share", "packed into", "No eval split"):
        assert part in text, part
    assert "\n" not in text
    assert bundle.eval is None and bundle.packed and bundle.pad_token_id == tiny_tok.pad_token_id


def test_eval_fraction_split_is_deterministic_and_disjoint(tiny_tok, write_jsonl, data_cfg, chat_row):
    path = write_jsonl(_rows(chat_row, 40))

    def split(seed):
        bundle = build_datasets(data_cfg(path, eval_fraction=0.1, packing=False), tiny_tok, seed=seed)
        return [ex["row"] for ex in bundle.train], [ex["row"] for ex in bundle.eval], bundle

    train, evaluation, bundle = split(5)
    assert (train, evaluation) == split(5)[:2]
    assert len(evaluation) == 4 and sorted(train + evaluation) == list(range(40))
    assert split(6)[1] != evaluation
    assert "eval_fraction 0.1" in bundle.report.summary() and bundle.report.splits["eval"].examples == 4


def test_eval_from_a_file_uses_the_train_format(tiny_tok, write_jsonl, data_cfg, chat_row):
    train = write_jsonl(_rows(chat_row, 6))
    evaluation = write_jsonl(_rows(chat_row, 3), name="eval.jsonl")
    bundle = build_datasets(data_cfg(train, eval=evaluation), tiny_tok, seed=0)
    assert bundle.report.sources["eval"].rows_kept == 3 and bundle.report.splits["eval"].examples == 3
    assert "eval.jsonl" in bundle.report.eval_from
    bad = write_jsonl([{"text": "not a chat"}], name="bad.jsonl")
    with pytest.raises(UserError, match=r"bad\.jsonl: row 0 \(line 1\): missing field 'messages'"):
        build_datasets(data_cfg(train, eval=bad), tiny_tok, seed=0)


def test_every_format_builds_batches(tiny_tok, write_jsonl, data_cfg):
    rows = {"alpaca": [{"instruction": "say hi", "output": "hi"}] * 3,
            "completion": [{"prompt": "2+2=", "completion": " 4"}] * 3,
            "text": [{"text": "once upon a time"}] * 3,
            "sharegpt": [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}] * 3}
    for fmt, data in rows.items():
        for packing in (False, True):
            bundle = build_datasets(data_cfg(write_jsonl(data, f"{fmt}.jsonl"), packing=packing), tiny_tok, seed=0)
            assert bundle.report.format == fmt
            batches = list(bundle.batches("train", micro_batch_size=2, shuffle=True, seed=0, epoch=0))
            assert sum(b["input_ids"].shape[0] for b in batches) == len(bundle.train)
            assert ("attention_mask" in batches[0]) is (not packing)


def test_user_errors_from_the_pipeline(tiny_tok, write_jsonl, data_cfg, tmp_path):
    odd = tmp_path / "data.txt"
    odd.write_text("hello")
    with pytest.raises(UserError, match=r"data\.train: '.*data\.txt' has unsupported file type '\.txt'"):
        build_datasets(data_cfg(str(odd)), tiny_tok, seed=0)
    empty = write_jsonl([{"text": " "}, {"text": ""}])
    with pytest.raises(UserError, match=r"data\.train: no usable examples .* \(read 2 rows; dropped: 2 empty text\)"):
        build_datasets(data_cfg(empty), tiny_tok, seed=0)
    empty_eval = write_jsonl([{"text": ""}], name="eval.jsonl")
    with pytest.raises(UserError, match=r"data\.eval: no usable examples from file .*\(dropped: 1 empty text\)"):
        build_datasets(data_cfg(write_jsonl([{"text": "fine"}]), eval=empty_eval), tiny_tok, seed=0)
    one = write_jsonl([{"text": "one row"}])
    with pytest.raises(UserError, match="eval_fraction = 0.5 needs at least 2 usable train rows, got 1"):
        build_datasets(data_cfg(one, eval_fraction=0.5), tiny_tok, seed=0)
