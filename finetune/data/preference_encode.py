"""PreferenceItems -> token ids: the prompt once, each answer on its own, cut to max_length, every drop counted.

Rendering is the SFT pipeline's (tokenize.py): a chat item is rendered by `chat_segments` on the conversation
prompt + answer, exactly as `finetune sft` renders it, and every segment is tokenized on its own, so the prompt's
tokens are what the model sees at inference after `add_generation_prompt=True` and the answer ends with the
template's end-of-turn marker. Plain items (all-string rows) are prompt + answer + EOS without a template, as the
SFT 'completion' format. The prompt rendered before each answer must be the same text; it always is for a
template that renders prefix by prefix (the property chat_segments checks).

Truncation (`fit`) applies max_length to the prompt plus the LONGER answer, so that both sides of a pair keep
the same prompt. It keeps the prompt's end (the question nearest the answer) and the answers' start; when both
are long the answers get half of max_length, when the prompt is short the answers get what the prompt leaves.
A prompt that alone fills max_length leaves nothing to compare and is dropped (TRL drops it too), as is a pair
whose answers become identical once cut. Both are counted in the split's stats (the data report).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from quant.errors import UserError

from .preference import PreferenceItem
from .report import SplitStats
from .tokenize import Renderer, chat_segments

_CHUNK = 512  # items per batched tokenizer call (as tokenize.py)


def encode_preferences(items: list[PreferenceItem], renderer: Renderer, max_length: int, stats: SplitStats,
                       where: Callable[[int], str]) -> list[dict]:
    """Examples {prompt: int32 ids, answers: [int32 ids, ...], desirable, pinned, row}; `pinned` counts the leading
    ids (BOS) that truncation keeps in front of the prompt's end."""
    examples = []
    for lo in range(0, len(items), _CHUNK):
        chunk = items[lo:lo + _CHUNK]
        prepared = [_texts(item, renderer, where(item.row)) for item in chunk]
        texts = [t for prompt, answers in prepared for t in (*prompt, *answers)]
        pieces = renderer.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"] \
            if texts else []
        k = 0
        for item, (prompt, answers) in zip(chunk, prepared):
            leading = list(renderer.leading_ids) if not item.chat or renderer.template else []
            prompt_ids = leading + [t for piece in pieces[k:k + len(prompt)] for t in piece]
            k += len(prompt)
            tail = [renderer.eos_id] if not item.chat and renderer.eos_id is not None else []
            answer_ids = [piece + tail for piece in pieces[k:k + len(answers)]]
            k += len(answers)
            example = _finish(item, prompt_ids, answer_ids, len(leading), max_length, stats)
            if example is not None:
                examples.append(example)
    return examples


def _texts(item: PreferenceItem, renderer: Renderer, where: str) -> tuple[list[str], list[str]]:
    """The prompt's text segments and each answer's text."""
    if not item.chat:
        return [item.prompt] if item.prompt else [], list(item.answers)
    prompt, answers = None, []
    for answer in item.answers:
        segments = chat_segments([*item.prompt, ("assistant", answer)], renderer, where)
        last = max(i for i, (_, is_answer) in enumerate(segments) if is_answer)
        before = [text for text, _ in segments[:last]]
        if prompt is not None and before != prompt:
            raise UserError(f"{where}: the chat template renders the prompt differently before the two answers, "
                            f"so they cannot be compared on the same prompt")
        prompt = before
        answers.append(segments[last][0])
    return prompt, answers


def fit(prompt: Sequence[int], answers: Sequence[Sequence[int]], max_length: int,
        pinned: int = 0) -> tuple[list[int], list[list[int]], bool] | None:
    """(prompt, answers, whether anything was cut) within max_length (see the module docstring), or None when the
    prompt alone fills max_length. The first `pinned` prompt ids (BOS) stay in front of the kept end."""
    longest = max(len(a) for a in answers)
    if len(prompt) >= max_length:
        return None
    if len(prompt) + longest <= max_length:
        return list(prompt), [list(a) for a in answers], False
    room = max(max_length - len(prompt), min(longest, max_length // 2))
    keep = max_length - room
    if keep < len(prompt):
        head = min(pinned, keep)
        prompt = list(prompt[:head]) + list(prompt[len(prompt) - (keep - head):])
    return list(prompt), [list(a[:room]) for a in answers], True


def _finish(item: PreferenceItem, prompt: list[int], answers: list[list[int]], pinned: int, max_length: int,
            stats: SplitStats) -> dict | None:
    fitted = fit(prompt, answers, max_length, pinned)
    if fitted is None:
        stats.dropped["prompt alone fills max_length"] += 1
        return None
    prompt, answers, cut = fitted
    if len(answers) == 2 and answers[0] == answers[1]:
        stats.dropped["chosen and rejected identical within max_length"] += 1
        return None
    # Nothing predicts a sequence's first token: with an empty prompt, the answer's first token is not scored.
    scored = [len(a) - (0 if prompt else 1) for a in answers]
    if min(scored) < 1:
        stats.dropped["no scored answer tokens"] += 1
        return None
    stats.truncated += cut
    stats.examples += 1
    stats.tokens += sum(len(prompt) + len(a) for a in answers)
    stats.label_tokens += sum(scored)
    return {"prompt": np.asarray(prompt, dtype=np.int32), "answers": [np.asarray(a, dtype=np.int32) for a in answers],
            "desirable": item.desirable, "pinned": min(pinned, len(prompt)), "row": item.row}
