"""The record formats both packages read (chat, sharegpt, alpaca, completion, text): which one a file holds, and
the text of a row, for calibration.

One home for the format knowledge that `finetune` (training data, finetune.data.formats) and `quant`
(calibration data, quant.calibration) share: the formats' names, the fields each needs, the ShareGPT role names,
and detection from the columns. `quant` never imports `finetune`, so it lives here, below both. Training turns a
row into template-rendered, label-masked examples (finetune.data); calibration needs only the row's text
(`row_texts`): the contents of its turns or fields in order, without a chat template (a base model being
quantized may have none; `finetune merge --calib` renders through the template instead, what the merged model
will be fed).
"""

from __future__ import annotations

import math
from typing import Iterable

from quant.errors import UserError

FORMATS = ("chat", "sharegpt", "alpaca", "completion", "text")
NEEDS = {
    "chat": "'messages': a list of {'role', 'content'} turns",
    "sharegpt": "'conversations': a list of {'from', 'value'} turns",
    "alpaca": "'instruction' and 'output' ('input' optional)",
    "completion": "'prompt' and 'completion'",
    "text": "'text'",
}
# ShareGPT dumps name the assistant after whichever product produced the turn.
ROLE_MAP = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
}
_TURN_KEYS = {"chat": ("role", "content"), "sharegpt": ("from", "value")}
_FIELDS = {"alpaca": ("instruction", "input", "output"), "completion": ("prompt", "completion"), "text": ("text",)}


def detect_format(columns: Iterable[str], rows: Iterable[dict], source: str) -> tuple[str, str]:
    """Pick a format from the column names (and the shape of the turns in the first rows); return it and the
    reason, for the report. UserError naming `source` when no format fits."""
    cols = set(columns)
    for col in ("messages", "conversations"):
        if col in cols:
            keys = _turn_keys(rows, col)
            if {"from", "value"} <= keys:
                return "sharegpt", f"auto: column '{col}' holds turns with 'from'/'value'"
            if {"role", "content"} <= keys:
                return "chat", f"auto: column '{col}' holds turns with 'role'/'content'"
            if not keys:
                raise UserError(f"{source}: cannot detect the format: column '{col}' has no turns in the "
                                f"first rows; set data.format")
            raise UserError(f"{source}: cannot detect the format: turns in '{col}' have keys "
                            f"{sorted(keys)}, expected 'role'/'content' (chat) or 'from'/'value' (sharegpt)")
    if {"instruction", "output"} <= cols:
        return "alpaca", "auto: columns 'instruction' and 'output'"
    if {"prompt", "completion"} <= cols:
        return "completion", "auto: columns 'prompt' and 'completion'"
    if "text" in cols:
        return "text", "auto: column 'text'"
    raise UserError(f"{source}: cannot detect the data format from columns {sorted(cols)}; expected "
                    f"'messages' (chat), 'conversations' (sharegpt), 'instruction'+'output' (alpaca), "
                    f"'prompt'+'completion' (completion) or 'text'; or set data.format")


def _turn_keys(rows: Iterable[dict], col: str, probe: int = 100) -> set[str]:
    for i, row in enumerate(rows):
        if i >= probe:
            break
        turns = row.get(col) if isinstance(row, dict) else None
        if isinstance(turns, list):
            for turn in turns:
                if isinstance(turn, dict):
                    return {k for k, v in turn.items() if v is not None}
    return set()


def _text(value) -> str | None:
    """A field's value as text: strings that encode, finite numbers; None for anything else (calibration skips
    what training would refuse or drop)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate
            return None
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return None


def row_texts(row, fmt: str) -> list[str]:
    """The text pieces a row of `fmt` holds, in order: each turn's content (known roles only), or the format's
    fields; empty when the row holds none."""
    if not isinstance(row, dict):
        return []
    if fmt in _TURN_KEYS:
        role_key, content_key = _TURN_KEYS[fmt]
        turns = row.get("messages" if fmt == "chat" else "conversations")
        if turns is None:
            turns = row.get("conversations" if fmt == "chat" else "messages")
        pieces = [_text(t.get(content_key)) for t in turns if isinstance(t, dict)
                  and ROLE_MAP.get(str(t.get(role_key)).strip().lower())] if isinstance(turns, list) else []
    else:
        pieces = [_text(row.get(name)) for name in _FIELDS[fmt]]
    return [p for p in pieces if p and p.strip()]
