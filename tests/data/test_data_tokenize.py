"""Rendering, prompt masking and truncation, on the tiny tokenizer and (twice) on the real SmolLM2 tokenizer."""

import pytest

from finetune.data import PLAIN_TEMPLATE, Chat, Plain
from finetune.data import tokenize as tk
from finetune.data.report import SplitStats
from quant.errors import UserError


def _encode(tok, items, fmt="chat", max_length=512, train_on_prompt=False):
    stats = SplitStats()
    out = tk.encode(items, tk.make_renderer(tok, fmt), max_length, train_on_prompt, stats, lambda r: f"f: row {r}")
    return out, stats


CONV = Chat(0, [("user", "hello there"), ("assistant", "fine thanks"), ("user", "and you?"),
                ("assistant", "the assistant answers")])


def test_only_assistant_turns_and_their_end_marker_are_trained(tiny_tok, trained_text):
    [ex], stats = _encode(tiny_tok, [CONV])
    messages = [{"role": r, "content": c} for r, c in CONV.turns]
    assert tiny_tok.decode(ex["input_ids"]) == tiny_tok.apply_chat_template(messages, tokenize=False)
    assert trained_text(tiny_tok, ex) == "fine thanks<|im_end|>the assistant answers<|im_end|>"
    # Each masked position keeps -100, each trained one its own token id.
    for token, label in zip(ex["input_ids"], ex["labels"]):
        assert label in (-100, token)
    assert ex["labels"][0] == -100
    assert stats.examples == 1 and stats.label_tokens == sum(int(x != -100) for x in ex["labels"])


def test_train_on_prompt_trains_everything_but_the_first_token(tiny_tok):
    [ex], _ = _encode(tiny_tok, [CONV], train_on_prompt=True)
    assert ex["labels"][0] == -100
    assert list(ex["labels"][1:]) == list(ex["input_ids"][1:])


def test_completion_and_text_get_eos_and_the_right_mask(tiny_tok, trained_text):
    [comp], _ = _encode(tiny_tok, [Plain(0, [("2+2=", False), (" 4", True)])], fmt="completion")
    assert tiny_tok.decode(comp["input_ids"]) == "2+2= 4<|im_end|>"
    assert trained_text(tiny_tok, comp) == " 4<|im_end|>"
    [text], _ = _encode(tiny_tok, [Plain(0, [("once upon a time", True)])], fmt="text")
    assert tiny_tok.decode(text["input_ids"]) == "once upon a time<|im_end|>"
    assert tiny_tok.decode(text["input_ids"][1:]) == trained_text(tiny_tok, text)


def test_a_tokenizer_that_adds_bos_gets_it_on_untemplated_text(plain_tok, trained_text):
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(plain_tok)
    # Llama-style: the tokenizer puts BOS in front of text by itself; no chat template supplies one.
    tok._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    [text], _ = _encode(tok, [Plain(0, [("once upon a time", True)])], fmt="text")
    assert text["input_ids"][0] == tok.bos_token_id and text["labels"][0] == -100
    assert trained_text(tok, text) == "once upon a time<|im_end|>"
    [chat], _ = _encode(tok, [Chat(0, [("user", "q"), ("assistant", "a")])])  # the plain fallback template
    assert chat["input_ids"][0] == tok.bos_token_id and list(chat["input_ids"]).count(tok.bos_token_id) == 1


def test_alpaca_uses_the_chat_template_or_the_plain_fallback(tiny_tok, plain_tok, trained_text):
    item = Chat(0, [("user", "Say hello.\n\nto Anna"), ("assistant", "Hello Anna")])
    [with_template], _ = _encode(tiny_tok, [item], fmt="alpaca")
    assert "<|im_start|>user\nSay hello.\n\nto Anna<|im_end|>" in tiny_tok.decode(with_template["input_ids"])
    assert trained_text(tiny_tok, with_template) == "Hello Anna<|im_end|>"
    renderer = tk.make_renderer(plain_tok, "alpaca")
    assert renderer.template == PLAIN_TEMPLATE and "### Instruction" in renderer.description
    [plain], _ = _encode(plain_tok, [item], fmt="alpaca")
    assert plain_tok.decode(plain["input_ids"]) == \
        "### Instruction:\nSay hello.\n\nto Anna\n\n### Response:\nHello Anna<|im_end|>\n\n"
    assert trained_text(plain_tok, plain) == "Hello Anna<|im_end|>"


def test_truncation_is_counted_and_answerless_remainders_dropped(tiny_tok):
    long_answer = Chat(0, [("user", "q"), ("assistant", "the assistant answers it " * 20)])
    long_prompt = Chat(1, [("user", "the user asks a question " * 40), ("assistant", "a")])
    short = Chat(2, [("user", "q"), ("assistant", "a")])
    examples, stats = _encode(tiny_tok, [long_answer, long_prompt, short], max_length=40)
    assert [ex["row"] for ex in examples] == [0, 2]
    assert len(examples[0]["input_ids"]) == 40
    assert stats.truncated == 2
    assert stats.dropped == {"no trained tokens within max_length": 1}
    assert stats.tokens == sum(len(ex["input_ids"]) for ex in examples)


def test_skipping_text_beyond_max_length_changes_nothing(tiny_tok, monkeypatch):
    items = [Chat(i, [("user", "hello " * (5 + 13 * i)), ("assistant", "fine thanks " * (3 + 7 * i))] * 3)
             for i in range(6)] + [Plain(9, [("ship three blue mugs " * 30, True)])]
    reference, ref_stats = _encode(tiny_tok, items, max_length=64)
    # A bound of one character per token cuts every long text too short, which forces the full re-encode path.
    for chars_per_token in (1, 3):
        monkeypatch.setattr(tk, "_CHARS_PER_TOKEN", chars_per_token)
        capped, stats = _encode(tiny_tok, items, max_length=64)
        assert stats == ref_stats
        for a, b in zip(capped, reference):
            assert list(a["input_ids"]) == list(b["input_ids"]) and list(a["labels"]) == list(b["labels"])


def test_template_that_moves_prefixes_or_refuses_is_a_user_error(tiny_tok):
    import copy

    tok = copy.deepcopy(tiny_tok)
    # Renders the number of messages first, so a prefix of the conversation is not a prefix of its rendering.
    tok.chat_template = "{{ messages|length }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match=r"f: row 0: the tokenizer's chat template does not render this conversation"):
        _encode(tok, [CONV])
    [ex], _ = _encode(tok, [CONV], train_on_prompt=True)  # the suggested way out works
    assert len(ex["input_ids"]) > 10
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(UserError, match="f: row 0: the chat template of .* refused this conversation: TemplateError: "
                                        "Conversation roles"):
        _encode(tok, [CONV])


def test_real_smollm2_template_masks_exactly_the_answers(smol_tok, trained_text):
    item = Chat(0, [("system", "Answer in JSON."), ("user", "Ship 3 blue mugs to Anna Berg in Oslo by Friday"),
                    ("assistant", '{"item": "mug", "qty": 3}'), ("user", "Thanks!"), ("assistant", "You're welcome.")])
    [ex], _ = _encode(smol_tok, [item])
    assert trained_text(smol_tok, ex) == '{"item": "mug", "qty": 3}<|im_end|>You\'re welcome.<|im_end|>'
    messages = [{"role": r, "content": c} for r, c in item.turns]
    # Segment-wise tokenization equals tokenizing the whole rendering (no merge across a boundary) ...
    full = smol_tok(smol_tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert list(ex["input_ids"]) == full
    # ... and the prompt tokens are exactly what generation starts from.
    prompt = smol_tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    prompt_ids = smol_tok(prompt, add_special_tokens=False)["input_ids"]
    assert list(ex["input_ids"][:len(prompt_ids)]) == prompt_ids
    assert all(label == -100 for label in ex["labels"][:len(prompt_ids)])
    assert ex["labels"][len(prompt_ids)] == ex["input_ids"][len(prompt_ids)]
