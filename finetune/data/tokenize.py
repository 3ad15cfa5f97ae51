"""Common-form items -> token ids and labels, with -100 on every token the loss must ignore.

Finding the assistant tokens. A conversation is rendered with the chat template once in full and once per
assistant turn as two prefixes: the conversation before the turn with the generation prompt (where the answer
starts) and the conversation through the turn (where it ends). The character offsets of those prefixes cut the
full text into prompt and answer segments, and each segment is tokenized on its own, so a token never straddles
a prompt/answer boundary and the prompt tokens are exactly what the model sees at inference after
`add_generation_prompt=True`. This needs no `{% generation %}` tags (SmolLM2's ChatML template has none) and
works for any template whose renderings of a prefix are prefixes of the full rendering; a template that breaks
that property is reported as a UserError instead of silently mis-masking. The answer segment ends after the
template's end-of-turn marker (e.g. `<|im_end|>`, which the model must learn to emit); whitespace the template
puts after the marker stays in the prompt.

Labels are aligned with input_ids (HF convention: `labels[t] == input_ids[t]` or -100); the loss shifts by one.
The first token of every example gets -100: nothing in the example predicts it, and under packing this makes the
last token of the previous example predict -100 instead of the next example's first token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from quant.errors import UserError

from .formats import Chat, Item, Plain
from .report import SplitStats
from .template import render

IGNORE = -100
_CHUNK = 512  # items per batched tokenizer call: large enough for the Rust tokenizer's batching, small in memory
_CHARS_PER_TOKEN = 12  # ~2x the most seen on real chat data (ShareGPT: 6.1 over 2048 tokens, mean 4.2)

# For tokenizers without a chat template (base models): the Alpaca layout, which many base models have seen.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + m['content'] ~ (eos_token or '') ~ '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


@dataclass
class Renderer:
    tokenizer: Any
    template: str | None  # None: the tokenizer's own chat template
    leading_ids: list[int]  # what the tokenizer itself puts before text (BOS), for text rendered without its template
    eos_id: int | None
    description: str


def make_renderer(tokenizer, fmt: str) -> Renderer:
    leading = _leading_special_ids(tokenizer)
    eos = tokenizer.eos_token_id
    if fmt in ("completion", "text"):
        end = "EOS appended" if eos is not None else "no EOS (the tokenizer has none)"
        what = "prompt and completion concatenated" if fmt == "completion" else "each text"
        return Renderer(tokenizer, None, leading, eos, f"{what} tokenized without a template, {end}")
    if getattr(tokenizer, "chat_template", None):
        return Renderer(tokenizer, None, [], eos, "rendered with the tokenizer's chat template")
    return Renderer(tokenizer, PLAIN_TEMPLATE, leading, eos,
                    "the tokenizer has no chat template, so turns are rendered as '### Instruction:' / "
                    "'### Response:' blocks")


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer adds in front of plain text by itself (a Llama-style BOS), found by probing."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return list(full[:k])
    return []


# ---------------------------------------------------------------------------------------------- segments


def chat_segments(turns: list[tuple[str, str]], renderer: Renderer, where: str,
                  train_on_prompt: bool = False) -> list[tuple[str, bool]]:
    """Cut the rendered conversation into (text, is_answer) segments; see the module docstring."""
    messages = [{"role": role, "content": content} for role, content in turns]
    full = _render(renderer, messages, False, where)
    if train_on_prompt:
        # Every token is trained on, so answer boundaries are not needed (and odd templates still work).
        return [(full, True)]
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _render(renderer, messages[:i], True, where)
        through = _render(renderer, messages[:i + 1], False, where).rstrip()
        start, end = len(before), len(through)
        if not (full.startswith(before) and full.startswith(through) and pos <= start < end):
            raise UserError(f"{where}: the tokenizer's chat template does not render this conversation "
                            f"prefix by prefix (turn {i} moves), so answer tokens cannot be located; set "
                            f"data.train_on_prompt: true or use format completion")
        segments += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    segments.append((full[pos:], False))
    return [(text, trained) for text, trained in segments if text]


def _render(renderer: Renderer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    """The chat template applied within a bound on steps, time and size (finetune.data.template)."""
    return render(renderer.tokenizer, messages, generation_prompt, renderer.template, where)


def _segments(item: Item, renderer: Renderer, where: str, train_on_prompt: bool,
              budget: int | None) -> tuple[list[tuple[str, bool]], list[int], bool]:
    """The item's text segments, the ids to put before them (BOS, when no chat template supplies its own), and
    whether text beyond `budget` characters was left out."""
    capped = False
    if isinstance(item, Chat):
        turns = item.turns
        if budget is not None:
            turns = _turns_within(turns, budget)
            capped = len(turns) < len(item.turns)
        segments = chat_segments(turns, renderer, where, train_on_prompt)
        leading = renderer.leading_ids if renderer.template else []
    else:
        segments, leading = [(text, trained) for text, trained in item.parts if text], renderer.leading_ids
    if budget is not None:
        cut, used = [], 0
        for text, trained in segments:
            if used >= budget:
                capped = True
                break
            if used + len(text) > budget:
                text, capped = text[:budget - used], True
            cut.append((text, trained))
            used += len(text)
        segments = cut
    return segments, list(leading), capped


def _turns_within(turns: list[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
    """The turns up to and including the one whose content crosses `budget` characters; later ones cannot fit."""
    used = 0
    for k, (_, content) in enumerate(turns):
        used += len(content)
        if used > budget:
            return turns[:k + 1]
    return turns


# ---------------------------------------------------------------------------------------------- encoding


def encode(items: list[Item], renderer: Renderer, max_length: int, train_on_prompt: bool, stats: SplitStats,
           where: Callable[[int], str]) -> list[dict]:
    """Tokenize, mask, truncate. Returns dicts of int32 arrays `input_ids`, `labels`, plus the source `row`.

    Chat dumps hold conversations of 100k+ tokens that end up truncated to max_length; rendering and tokenizing
    all of them dominated the run time. So text beyond max_length * _CHARS_PER_TOKEN characters is not
    tokenized; in the rare case where that cut leaves too few tokens (very long tokens), the item is redone in full.
    """
    budget = max_length * _CHARS_PER_TOKEN
    examples: list[dict] = []
    for lo in range(0, len(items), _CHUNK):
        chunk = items[lo:lo + _CHUNK]
        prepared = [_segments(item, renderer, where(item.row), train_on_prompt, budget) for item in chunk]
        pieces = _tokenize([text for segments, _, _ in prepared for text, _ in segments], renderer)
        k = 0
        for item, (segments, leading, capped) in zip(chunk, prepared):
            ids, trained = _assemble(item, segments, pieces[k:k + len(segments)], leading, renderer, train_on_prompt)
            k += len(segments)
            if capped and len(ids) <= max_length:
                segments, leading, capped = _segments(item, renderer, where(item.row), train_on_prompt, None)
                ids, trained = _assemble(item, segments, _tokenize([t for t, _ in segments], renderer), leading,
                                         renderer, train_on_prompt)
            stats.lengths.append(len(ids) if not capped else _estimated_length(item, segments, len(ids)))
            example = _finish(item.row, ids, trained, max_length, stats)
            if example is not None:
                examples.append(example)
    return examples


def _estimated_length(item: Item, segments: list[tuple[str, bool]], n_tokens: int) -> int:
    """Tokens of the whole item, from the tokens of the part that was tokenized and the characters of both."""
    total = sum(len(c) for _, c in item.turns) if isinstance(item, Chat) else sum(len(t) for t, _ in item.parts)
    kept = sum(len(t) for t, _ in segments)
    return max(n_tokens, math.ceil(n_tokens * total / max(kept, 1)))


def _tokenize(texts: list[str], renderer: Renderer) -> list[list[int]]:
    if not texts:
        return []
    return renderer.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _assemble(item: Item, segments: list[tuple[str, bool]], pieces: list[list[int]], leading: list[int],
              renderer: Renderer, train_on_prompt: bool) -> tuple[list[int], list[bool]]:
    ids, trained = list(leading), [train_on_prompt] * len(leading)
    for (_, is_answer), piece in zip(segments, pieces):
        ids += piece
        trained += [is_answer or train_on_prompt] * len(piece)
    if isinstance(item, Plain) and renderer.eos_id is not None:
        # EOS ends the completion, so it is trained whenever the last piece is.
        ids.append(renderer.eos_id)
        trained.append(bool(segments) and segments[-1][1] or train_on_prompt)
    return ids, trained


def _finish(row: int, ids: list[int], trained: list[bool], max_length: int, stats: SplitStats) -> dict | None:
    if len(ids) > max_length:
        ids, trained = ids[:max_length], trained[:max_length]
        stats.truncated += 1
    input_ids = np.asarray(ids, dtype=np.int32)
    labels = np.where(np.asarray(trained, dtype=bool), input_ids, IGNORE).astype(np.int32)
    if len(labels):
        labels[0] = IGNORE
    n_labels = int((labels != IGNORE).sum())
    if n_labels == 0:
        stats.dropped["no trained tokens within max_length"] += 1
        return None
    stats.examples += 1
    stats.tokens += len(input_ids)
    stats.label_tokens += n_labels
    return {"input_ids": input_ids, "labels": labels, "row": row}
