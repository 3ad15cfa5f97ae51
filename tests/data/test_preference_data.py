"""Preference data: the hub layouts, rendering as SFT renders, truncation, counted drops, batches, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.data import Chat, Plain
from finetune.data import tokenize as tk
from finetune.data.check import check_data, write_eval_split
from finetune.data.preference_collate import collate_preferences
from finetune.data.preference_data import build_preference_data
from finetune.data.preference_encode import fit
from finetune.data.report import SplitStats
from quant.errors import UserError

Q, GOOD, BAD = "ship three blue mugs", "to anna berg in oslo", "no"


def build(data_cfg, write_jsonl, tok, rows, paired=True, **kw):
    kw.setdefault("max_length", 256)
    return build_preference_data(data_cfg(write_jsonl(rows), **kw), tok, seed=0, paired=paired)


def decoded(tok, example) -> tuple[str, list[str]]:
    return tok.decode(example["prompt"]), [tok.decode(a) for a in example["answers"]]


def test_hub_layouts_give_the_same_pairs(data_cfg, write_jsonl, tiny_tok):
    user, good, bad = {"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}, \
        {"role": "assistant", "content": BAD}
    layouts = {
        "prompt list + answer strings": {"prompt": [user], "chosen": GOOD, "rejected": BAD},
        "UltraFeedback (TRL): prompt list + answer lists": {"prompt": [user], "chosen": [good], "rejected": [bad]},
        "Anthropic HH: whole conversations": {"chosen": [user, good], "rejected": [user, bad]},
        "H4 UltraFeedback: prompt string + whole conversations": {"prompt": Q, "chosen": [user, good],
                                                                 "rejected": [user, bad]},
        "ShareGPT keys": {"chosen": [{"from": "human", "value": Q}, {"from": "gpt", "value": GOOD}],
                          "rejected": [{"from": "human", "value": Q}, {"from": "gpt", "value": BAD}]},
    }
    seen = {}
    for name, row in layouts.items():
        [example] = build(data_cfg, write_jsonl, tiny_tok, [row]).train
        seen[name] = decoded(tiny_tok, example)
    want = tiny_tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert all(got == (want, [GOOD + "<|im_end|>", BAD + "<|im_end|>"]) for got in seen.values()), seen


def test_a_chat_pair_is_rendered_and_masked_exactly_as_sft_renders_it(data_cfg, write_jsonl, tiny_tok):
    history = [("system", "be brief"), ("user", "hello there"), ("assistant", "fine thanks"), ("user", Q)]
    row = {"prompt": [{"role": r, "content": c} for r, c in history], "chosen": GOOD, "rejected": BAD}
    [example] = build(data_cfg, write_jsonl, tiny_tok, [row]).train
    for answer, ids in zip((GOOD, BAD), example["answers"]):
        [sft] = tk.encode([Chat(0, history + [("assistant", answer)])], tk.make_renderer(tiny_tok, "chat"), 512,
                          False, SplitStats(), str)
        sequence = np.concatenate([example["prompt"], ids])
        assert list(sft["input_ids"][:len(sequence)]) == list(sequence)  # SFT also keeps the template's trailing \n
        # SFT trains on every answer; here only the last one is compared, the earlier one is prompt.
        last = sft["labels"][len(example["prompt"]):len(sequence)]
        assert list(last) == list(ids)


def test_string_pairs_are_rendered_as_sft_completions(data_cfg, write_jsonl, plain_tok):
    [example] = build(data_cfg, write_jsonl, plain_tok, [{"prompt": Q, "chosen": GOOD, "rejected": BAD}]).train
    for answer, ids in zip((GOOD, BAD), example["answers"]):
        [sft] = tk.encode([Plain(0, [(Q, False), (answer, True)])], tk.make_renderer(plain_tok, "completion"), 512,
                          False, SplitStats(), str)
        assert list(sft["input_ids"]) == list(example["prompt"]) + list(ids)
        assert list(sft["labels"][len(example["prompt"]):]) == list(ids)
        assert ids[-1] == plain_tok.eos_token_id


def test_rows_without_a_preference_are_dropped_and_counted(data_cfg, write_jsonl, tiny_tok):
    text = tiny_tok.apply_chat_template([{"role": "user", "content": Q}], tokenize=False, add_generation_prompt=True)
    prompt = len(tiny_tok(text, add_special_tokens=False)["input_ids"])
    long = " ".join([GOOD] * 10)
    rows = [
        {"prompt": Q, "chosen": GOOD, "rejected": BAD},
        {"prompt": Q, "chosen": GOOD, "rejected": GOOD},
        {"prompt": Q, "chosen": "  ", "rejected": BAD},
        {"prompt": [{"role": "user", "content": Q}], "chosen": [], "rejected": BAD},
        {"prompt": "x " * 300, "chosen": GOOD, "rejected": BAD},
        {"prompt": Q, "chosen": long + " and more", "rejected": long + " and less"},  # the same within max_length
        {"prompt": Q, "chosen": long, "rejected": BAD},
    ]
    bundle = build(data_cfg, write_jsonl, tiny_tok, rows, max_length=prompt + 16)
    source, split = bundle.report.sources["train"], bundle.report.splits["train"]
    assert (source.rows_read, source.rows_kept) == (7, 4)
    assert dict(source.dropped) == {"chosen and rejected are identical": 1, "empty chosen or rejected answer": 2}
    assert dict(split.dropped) == {"prompt alone fills max_length": 1,
                                   "chosen and rejected identical within max_length": 1}
    assert split.examples == 2 and len(bundle.train) == 2 and split.truncated == 1
    summary = bundle.report.summary()
    assert "kept 4, dropped 3 (2 empty chosen or rejected answer, 1 chosen and rejected are identical)" in summary
    assert "2 examples, 1 truncated at" in summary and "1 prompt alone fills max_length" in summary


def test_truncation_keeps_the_prompts_end_and_the_answers_start():
    prompt, chosen, rejected = list(range(100, 160)), list(range(40)), list(range(30))
    cut_prompt, (c, r), cut = fit(prompt, [chosen, rejected], 64, pinned=1)
    assert cut and len(cut_prompt) + len(c) == 64 and len(c) == 32  # both long: the answers get half
    assert cut_prompt == [100] + prompt[-31:]  # the pinned BOS, then the prompt's end
    assert c == chosen[:32] and r == rejected  # answers keep their start; the shorter one fits whole
    short, (c, _), cut = fit(prompt[:10], [chosen + chosen, rejected], 64)
    assert cut and short == prompt[:10] and c == (chosen + chosen)[:54]  # a short prompt stays whole
    assert fit(prompt + prompt[:4], [chosen], 64) is None  # the prompt alone fills max_length
    assert fit(prompt[:10], [chosen], 64) == (prompt[:10], [chosen], False)


def test_truncation_is_counted_and_applies_to_the_longer_answer(data_cfg, write_jsonl, tiny_tok):
    user = [{"role": "user", "content": Q}]
    rows = [{"prompt": user, "chosen": "long answer " * 20, "rejected": BAD}, {"prompt": user, "chosen": GOOD,
                                                                              "rejected": BAD}]
    bundle = build(data_cfg, write_jsonl, tiny_tok, rows, max_length=48)
    assert bundle.report.splits["train"].truncated == 1
    for example in bundle.train:
        assert len(example["prompt"]) + max(len(a) for a in example["answers"]) <= 48
        assert tiny_tok.decode(example["prompt"]).endswith("<|im_start|>assistant\n")  # the prompt's end is kept


def test_kto_rows_and_pairs_split_for_kto(data_cfg, write_jsonl, tiny_tok):
    rows = [{"prompt": Q, "completion": GOOD, "label": True}, {"prompt": Q, "completion": BAD, "label": "false"},
            {"prompt": Q, "completion": "maybe", "label": 1}]
    bundle = build(data_cfg, write_jsonl, tiny_tok, rows, paired=False)
    assert [e["desirable"] for e in bundle.train] == [True, False, True]
    pairs = build(data_cfg, write_jsonl, tiny_tok, [{"prompt": Q, "chosen": GOOD, "rejected": BAD}], paired=False)
    assert [(decoded(tiny_tok, e)[1], e["desirable"]) for e in pairs.train] == [
        ([GOOD + "<|im_end|>"], True), ([BAD + "<|im_end|>"], False)]


def test_a_kto_eval_fraction_keeps_both_halves_of_a_pair_together(data_cfg, write_jsonl, tiny_tok):
    rows = [{"prompt": f"{Q} {k}", "chosen": GOOD, "rejected": BAD} for k in range(10)]
    bundle = build(data_cfg, write_jsonl, tiny_tok, rows, paired=False, eval_fraction=0.3)
    train_rows, eval_rows = {e["row"] for e in bundle.train}, {e["row"] for e in bundle.eval}
    assert len(eval_rows) == 3 and not train_rows & eval_rows and len(bundle.eval) == 6


def test_a_pair_batch_is_one_forward_with_answers_labelled(data_cfg, write_jsonl, tiny_tok):
    rows = [{"prompt": Q, "chosen": GOOD, "rejected": BAD}, {"prompt": "hi", "chosen": "hello", "rejected": "go"}]
    bundle = build(data_cfg, write_jsonl, tiny_tok, rows)
    for packed in (False, True):
        batch = collate_preferences(bundle.train, bundle.pad_token_id, packed, bundle.max_length)
        assert batch["pairs"] == 2 and batch["num_sequences"] == 4 and ("attention_mask" in batch) != packed
        labelled = batch["labels"][:, 1:].reshape(-1)
        assert (labelled[batch["answer_index"]] != -100).all() and (labelled != -100).sum() == len(
            batch["answer_index"])
        tokens = batch["input_ids"][:, 1:].reshape(-1)[batch["answer_index"]]
        for s, want in enumerate([GOOD, "hello", BAD, "go"]):  # chosen first, then rejected (TRL's order)
            assert tiny_tok.decode(tokens[batch["answer_sequence"] == s]) == want + "<|im_end|>"
    assert len(collate_preferences(bundle.train, 0, True, 256)["input_ids"]) == 1  # all four in one packed row


def test_kto_batches_carry_mismatched_pairs_fixed_when_the_data_is_built(data_cfg, write_jsonl, tiny_tok):
    """Each example's mismatched completion (for KTO's KL estimate) is chosen once, when the data is built (as TRL
    builds its KL dataset, and so that a reference pass before training can score it): another row's completion,
    never the other half of its own pair, the same for the same seed."""
    rows = [{"prompt": f"q{k}", "chosen": f"good {k}", "rejected": f"bad {k}"} for k in range(4)]
    bundle = build(data_cfg, write_jsonl, tiny_tok, rows, paired=False)
    again = build(data_cfg, write_jsonl, tiny_tok, rows, paired=False)
    assert [tiny_tok.decode(e["kl_answer"]) for e in bundle.train] == \
        [tiny_tok.decode(e["kl_answer"]) for e in again.train]
    for e in bundle.train:  # pairs split for KTO: examples 2k and 2k + 1 share row k's prompt
        assert not tiny_tok.decode(e["kl_answer"]).endswith(f" {e['row']}<|im_end|>"), e
    batch = collate_preferences(bundle.train, bundle.pad_token_id, False, bundle.max_length)
    assert batch["desirable"].tolist() == [True, False] * 4 and batch["num_desirable"] == 4
    kl = batch["kl"]
    for i, e in enumerate(bundle.train):
        text = tiny_tok.decode(kl["input_ids"][i][kl["attention_mask"][i] == 1])
        assert text == f"q{e['row']}" + tiny_tok.decode(e["kl_answer"]), text


def test_precomputed_reference_log_probs_travel_with_the_batch(data_cfg, write_jsonl, tiny_tok):
    """Per example [chosen, rejected] (KTO: [completion, mismatched]) become the batch's per-sequence order."""
    rows = [{"prompt": f"q{k}", "chosen": f"good {k}", "rejected": f"bad {k}"} for k in range(3)]
    for paired in (True, False):
        bundle = build(data_cfg, write_jsonl, tiny_tok, rows, paired=paired)
        for k, e in enumerate(bundle.train):
            e["reference_logps"] = np.array([-k, -10 - k], dtype=np.float32)
        batch = collate_preferences(bundle.train, bundle.pad_token_id, True, bundle.max_length)
        n = len(bundle.train)
        if paired:
            assert batch["reference_logps"].tolist() == [-k for k in range(n)] + [-10 - k for k in range(n)]
        else:
            assert batch["reference_logps"].tolist() == [-k for k in range(n)]
            assert batch["kl"]["reference_logps"].tolist() == [-10 - k for k in range(n)]


def test_wrong_columns_are_one_line_naming_file_columns_and_layouts(data_cfg, write_jsonl, tiny_tok):
    with pytest.raises(UserError) as e:
        build(data_cfg, write_jsonl, tiny_tok, [{"question": Q, "good": GOOD, "bad": BAD}])
    message = str(e.value)
    assert "train.jsonl: columns ['bad', 'good', 'question'] are not a preference layout" in message
    assert "'prompt' + 'chosen' + 'rejected'" in message and "'prompt' + 'completion' + 'label'" in message
    assert "\n" not in message


def test_mismatched_chat_prefixes_name_the_row(data_cfg, write_jsonl, tiny_tok):
    ok = {"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}],
          "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": BAD}]}
    off = {"chosen": ok["chosen"], "rejected": [{"role": "user", "content": Q + "?"}, ok["rejected"][1]]}
    with pytest.raises(UserError, match=r"train.jsonl: row 1 \(line 2\): 'chosen' and 'rejected' differ before "
                                        r"their last assistant turn \(turn 0\)"):
        build(data_cfg, write_jsonl, tiny_tok, [ok, off])


@pytest.mark.parametrize("rows,paired,message", [
    ([{"prompt": Q, "completion": GOOD, "label": True}], True, r"holds unpaired rows \(prompt/completion/label, "
                                                               r"for KTO\); DPO and ORPO compare two answers"),
    ([{"prompt": Q, "completion": GOOD, "label": "yes"}], False, r"row 0 \(line 1\): 'label' = 'yes' is not a KTO"),
    ([{"prompt": Q, "chosen": GOOD, "rejected": BAD}] * 100 + [{"prompt": Q, "chosen": [{"role": "assistant",
                                                                 "content": GOOD}], "rejected": BAD}], True,
     r"row 100 \(line 101\): 'chosen' holds chat messages but the file's first rows hold strings"),
    ([{"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}], "rejected": BAD}], True,
     r"row 0 \(line 1\): 'rejected' must be a list of chat turns"),
    ([{"chosen": [{"role": "user", "content": Q}], "rejected": [{"role": "user", "content": Q}]}], True,
     r"row 0 \(line 1\): 'chosen' does not end with an assistant turn"),
    ([{"chosen": GOOD, "rejected": BAD}], True, "'chosen'/'rejected' hold strings but there is no 'prompt' column"),
    ([{"prompt": Q, "chosen": GOOD}], True, "columns \\['chosen', 'prompt'\\] are not a preference layout"),
])
def test_bad_rows_are_one_line(data_cfg, write_jsonl, tiny_tok, rows, paired, message):
    with pytest.raises(UserError, match=message) as e:
        build(data_cfg, write_jsonl, tiny_tok, rows, paired=paired)
    assert "\n" not in str(e.value)


def test_nothing_usable_is_one_line_with_the_reasons(data_cfg, write_jsonl, tiny_tok):
    with pytest.raises(UserError, match=r"data.train: no usable preference examples in .*train.jsonl \(dropped: 1 "
                                        r"chosen and rejected are identical\)"):
        build(data_cfg, write_jsonl, tiny_tok, [{"prompt": Q, "chosen": GOOD, "rejected": GOOD}])


texts = st.text(alphabet=st.characters(codec=None, categories=None), max_size=20)  # lone surrogates included
values = texts | st.floats() | st.integers() | st.none() | st.booleans()
turn_lists = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "gpt", "x"]),
                                             "content": values}), max_size=3)
fields = values | turn_lists | st.dictionaries(st.text(max_size=4), values, max_size=2)
words = st.sampled_from(["", " ", "yes", "no", "ship", "blue mugs", "oslo"]) | texts
answers = words | st.lists(st.fixed_dictionaries({"role": st.just("assistant"), "content": words}), max_size=2)
shaped = st.fixed_dictionaries({"prompt": words | turn_lists, "chosen": answers, "rejected": answers}) | \
    st.fixed_dictionaries({"prompt": words, "completion": answers,
                           "label": st.booleans() | st.sampled_from(["true", "0", 1, "yes"])})
anything = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "completion", "label"]), fields,
                           min_size=2)
preference_rows = st.lists(shaped, min_size=1, max_size=6) | st.lists(shaped | anything, min_size=1, max_size=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(rows=preference_rows, paired=st.booleans())
def test_any_preference_rows_give_real_preferences_or_one_line(data_cfg, write_jsonl, tiny_tok, rows, paired):
    try:
        bundle = build(data_cfg, write_jsonl, tiny_tok, rows, paired=paired, max_length=64)
    except UserError as e:
        assert "\n" not in str(e)
        return
    for example in bundle.train:
        answers = [list(a) for a in example["answers"]]
        assert all(answers) and len(example["prompt"]) + max(map(len, answers)) <= 64
        assert paired == (example["desirable"] is None) and (len(answers) == 1 or answers[0] != answers[1])


def test_the_training_commands_check_preference_rows_before_loading_and_keep_the_held_out_pairs(
        data_cfg, write_jsonl, tiny_tok, tmp_path):
    rows = [{"prompt": f"{Q} {k}", "chosen": GOOD, "rejected": BAD} for k in range(10)]
    cfg = data_cfg(write_jsonl(rows), max_length=256, eval_fraction=0.3)
    assert "format 'preference pairs'" in check_data(cfg, preference=True)
    with pytest.raises(UserError, match="not a preference layout"):  # SFT rows given to `finetune dpo`
        check_data(data_cfg(write_jsonl([{"messages": [{"role": "user", "content": Q}]}], "sft.jsonl")), True)
    bundle = build_preference_data(cfg, tiny_tok, seed=0, paired=True)
    written = write_eval_split(cfg, 0, tmp_path, preference=True)
    kept = [json.loads(line) for line in written.read_text().splitlines()]
    assert kept == [rows[e["row"]] for e in sorted(bundle.eval, key=lambda e: e["row"])] and len(kept) == 3
