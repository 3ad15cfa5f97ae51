"""The committed preference quickstart data is what scripts/data/make_preference_data.py writes: the SFT quickstart's
notes and JSON answers (chosen) against SmolLM2-135M-Instruct's own greedy answers (rejected)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.data.preference_data import build_preference_data
from finetune.recipe import DataConfig
from scripts.data import make_preference_data as mpd
from support import single_thread

ROOT = Path(__file__).resolve().parents[2]


def committed(split: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "data" / "preference" / f"{split}.jsonl").read_text().splitlines()]


def test_pairs_are_the_quickstart_notes_with_its_json_chosen_and_a_free_text_answer_rejected(tiny_tok):
    for split, n in (("train", 160), ("eval", 80)):
        rows, source = committed(split), mpd.quickstart_rows(split, n)
        assert len(rows) == n
        for row, sft in zip(rows, source):
            assert row["prompt"] == sft["messages"][:1] and row["chosen"] == [sft["messages"][1]]
            assert [t["role"] for t in row["rejected"]] == ["assistant"]
            rejected = row["rejected"][0]["content"]
            assert rejected and rejected != row["chosen"][0]["content"]
    # Held-out pairs are the SFT quickstart's held-out notes: `finetune eval --data data/quickstart/eval.jsonl`
    # scores the same prompts.
    assert {r["prompt"][0]["content"] for r in committed("eval")} == \
        {r["messages"][0]["content"] for r in mpd.quickstart_rows("eval")}
    bundle = build_preference_data(DataConfig(train=str(ROOT / "data/preference/train.jsonl"),
                                              eval=str(ROOT / "data/preference/eval.jsonl"), max_length=256),
                                   tiny_tok, seed=0, paired=True)
    assert bundle.report.format == "preference pairs" and bundle.report.sources["train"].rows_kept == 160


@pytest.mark.slow
def test_the_first_batch_regenerates_exactly():
    """Greedy decoding in fixed batches: the first batch of train notes, generated alone, gives the committed text."""
    model, tokenizer = mpd.load()
    with single_thread():  # as the script generates
        rows = mpd.preference_rows(model, tokenizer, mpd.quickstart_rows("train", mpd.BATCH_SIZE))
    assert rows == committed("train")[:mpd.BATCH_SIZE]
