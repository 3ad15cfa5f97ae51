"""Rows of preference data -> `PreferenceItem`s: a prompt and the answers to compare (DPO, ORPO) or judge (KTO).

Layouts, recognised from the columns (the same names TRL and the hub's preference sets use):
  pairs          'prompt' + 'chosen' + 'rejected'. All strings: plain text, no chat template (as the SFT
                 'completion' format). Any of them a chat message list: the prompt is the conversation before the
                 answers (a string is one user turn) and each answer one assistant turn (a string, or a list of
                 assistant turns as in UltraFeedback-binarized).
  conversations  'chosen' + 'rejected' holding whole conversations (Anthropic HH style, also with a redundant
                 'prompt' column as in HuggingFaceH4/ultrafeedback_binarized): both must be the same conversation
                 up to their last assistant turn, which is the answer; a pair that differs earlier is refused.
  unpaired       'prompt' + 'completion' + 'label' (KTO): label true for a desirable completion.
Pairs become unpaired examples for KTO (`unpair`: chosen desirable, rejected undesirable), as TRL does.

Conversations go through the SFT chat format's own normalisation (formats._conversation: role names mapped,
empty turns dropped, same-role turns merged, each repair counted), so a preference set renders exactly as the
same conversations would for SFT. Rows whose answers are empty or identical are dropped and counted, never
trained on: they carry no preference.
"""

from __future__ import annotations

import functools
import reprlib
from dataclasses import dataclass
from typing import Union

from quant.errors import UserError

from .formats import ROLE_MAP, _conversation, _text_value, convert_rows
from .report import SourceStats
from .sources import Rows

LAYOUTS = {
    "pairs": "'prompt' + 'chosen' + 'rejected' (strings or chat message lists)",
    "conversations": "'chosen' + 'rejected' as whole conversations sharing every turn before the last answer",
    "unpaired": "'prompt' + 'completion' + 'label' (KTO, label true for a desirable completion)",
}
_LABELS = {"true": True, "false": False, "1": True, "0": False}

Turns = list[tuple[str, str]]  # (role, content) as formats.Chat holds them


@dataclass
class PreferenceItem:
    row: int
    prompt: Union[Turns, str]  # chat turns before the answer (ending in a user turn), or plain text
    answers: tuple[str, ...]  # (chosen, rejected), or (completion,) for KTO
    desirable: bool | None = None  # KTO's label; None for a pair

    @property
    def chat(self) -> bool:
        return not isinstance(self.prompt, str)


# ---------------------------------------------------------------------------------------------- detection


def is_preference(columns) -> bool:
    """Whether rows with these columns hold preference data (any layout) rather than SFT data."""
    return {"chosen", "rejected"} <= set(columns) or {"prompt", "completion", "label"} <= set(columns)


def detect_layout(rows: Rows) -> tuple[str, bool, str]:
    """(layout, rendered with the chat template, the reason for the report), from the columns and first rows."""
    cols = set(rows.columns)
    if {"chosen", "rejected"} <= cols:
        chat = _holds_lists(rows, ("prompt", "chosen", "rejected"))
        whole = chat and ("prompt" not in cols or _answers_hold_prompts(rows))
        layout = "conversations" if whole else "pairs"
    elif {"prompt", "completion", "label"} <= cols:
        layout, chat = "unpaired", _holds_lists(rows, ("prompt", "completion"))
    else:
        accepted = "; ".join(f"{name}: {need}" for name, need in LAYOUTS.items())
        raise UserError(f"{rows.source}: columns {sorted(cols)} are not a preference layout (accepted: {accepted})")
    if layout == "pairs" and "prompt" not in cols:
        raise UserError(f"{rows.source}: 'chosen'/'rejected' hold strings but there is no 'prompt' column "
                        f"(accepted: {LAYOUTS['pairs']}; or {LAYOUTS['conversations']})")
    rendering = "chat message lists" if chat else "strings"
    return layout, chat, f"auto: {LAYOUTS[layout]}, as {rendering}"


def _probe(rows: Rows, probe: int = 100):
    for i, row in enumerate(rows):
        if i >= probe:
            break
        yield row


def _holds_lists(rows: Rows, fields: tuple[str, ...]) -> bool:
    return any(_is_turns(row.get(f)) for row in _probe(rows) for f in fields)


def _is_turns(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, dict) and ("role" in t or "from" in t) for t in value)


def _answers_hold_prompts(rows: Rows) -> bool:
    """True when 'chosen' lists hold non-assistant turns: whole conversations next to a redundant prompt column."""
    for row in _probe(rows):
        turns = row.get("chosen")
        if _is_turns(turns) and turns:
            return any(ROLE_MAP.get(str(_role(t)).strip().lower()) != "assistant" for t in turns)
    return False


def _role(turn: dict):
    return turn.get("role", turn.get("from"))


# ---------------------------------------------------------------------------------------------- conversion


def convert_preferences(rows: Rows, layout: str, chat: bool, stats: SourceStats) -> list[PreferenceItem]:
    """Every usable row as a PreferenceItem; dropped rows are counted in `stats`, not returned."""
    return convert_rows(rows, functools.partial(_convert_row, layout=layout, chat=chat), stats)


def unpair(items: list[PreferenceItem]) -> list[PreferenceItem]:
    """Pairs as KTO examples: the chosen answer desirable, the rejected one undesirable."""
    out = []
    for item in items:
        if item.desirable is not None:
            return items  # already unpaired
        out += [PreferenceItem(item.row, item.prompt, (item.answers[0],), True),
                PreferenceItem(item.row, item.prompt, (item.answers[1],), False)]
    return out


def _convert_row(rows: Rows, index: int, row: dict, stats: SourceStats, layout: str,
                 chat: bool) -> PreferenceItem | None:
    names = ("completion",) if layout == "unpaired" else ("chosen", "rejected")
    desirable = _label(rows, index, _required(rows, index, row, "label", layout)) if layout == "unpaired" else None
    if chat:
        # The second side is normalised with scratch stats: its repairs mirror the first side's and are not news.
        parts = [_chat_item(rows, index, row, n, layout, stats if k == 0 else SourceStats(stats.source))
                 for k, n in enumerate(names)]
        if any(p is None for p in parts):
            if parts[0] is not None:  # the first side's drop is already counted
                stats.drop("no assistant turn")
            return None
        prompt, answers = parts[0][0], tuple(answer for _, answer in parts)
    else:
        prompt = _text_value(rows, index, _plain(rows, index, row, "prompt", layout), "field 'prompt'")
        answers = tuple(_text_value(rows, index, _plain(rows, index, row, n, layout), f"field '{n}'") for n in names)
    if any(not a.strip() for a in answers):
        stats.drop("empty answer" if layout == "unpaired" else "empty chosen or rejected answer")
        return None
    if chat and parts[-1][0] != prompt:
        raise UserError(f"{rows.where(index)}: 'chosen' and 'rejected' differ before their last assistant turn "
                        f"(turn {_first_difference(prompt, parts[-1][0])}); a pair must share the conversation up "
                        f"to its two answers")
    if len(answers) == 2 and answers[0] == answers[1]:
        stats.drop("chosen and rejected are identical")
        return None
    return PreferenceItem(index, prompt, answers, desirable)


def _required(rows: Rows, index: int, row: dict, name: str, layout: str):
    value = row.get(name)
    if value is None:
        raise UserError(f"{rows.where(index)}: missing field '{name}' ({layout} rows need {LAYOUTS[layout]})")
    return value


def _plain(rows: Rows, index: int, row: dict, name: str, layout: str):
    value = _required(rows, index, row, name, layout)
    if _is_turns(value):
        raise UserError(f"{rows.where(index)}: '{name}' holds chat messages but the file's first rows hold strings; "
                        f"use one layout for the whole file")
    return value


def _chat_item(rows: Rows, index: int, row: dict, name: str, layout: str,
               stats: SourceStats) -> tuple[Turns, str] | None:
    """(the turns before the last answer, the answer) of the conversation that `name` ends, "" for an empty answer,
    or None when normalisation left no answer (counted in `stats`)."""
    answer = _required(rows, index, row, name, layout)
    if answer == []:
        return [], ""
    if layout == "conversations":
        col, turns = name, _as_turns(rows, index, answer, None, name, ("role", "content"))
    else:
        prompt = _required(rows, index, row, "prompt", layout)
        keys = _keys(prompt, answer)
        col = f"prompt+{name}"
        turns = _as_turns(rows, index, prompt, "user", "prompt", keys) + \
            _as_turns(rows, index, answer, "assistant", name, keys)
    keys = _keys(turns)
    if not turns or ROLE_MAP.get(str(turns[-1].get(keys[0])).strip().lower()) != "assistant":
        raise UserError(f"{rows.where(index)}: '{name}' does not end with an assistant turn (a preference row "
                        f"compares final answers; accepted: {LAYOUTS[layout]})")
    last = turns[-1].get(keys[1])
    if last is None or (isinstance(last, str) and not last.strip()):
        return [], ""  # an empty answer: the caller drops the row, once
    fmt = "sharegpt" if keys[0] == "from" else "chat"
    conversation = _conversation(rows, index, turns, col, fmt, *keys, stats)
    if conversation is None:
        return None
    return conversation.turns[:-1], conversation.turns[-1][1]


def _keys(*values) -> tuple[str, str]:
    """('from', 'value') for ShareGPT-style turns, else ('role', 'content')."""
    for value in values:
        if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
            return "from", "value"
    return "role", "content"


def _as_turns(rows: Rows, index: int, value, role: str | None, name: str, keys: tuple[str, str]) -> list:
    """`value` as a list of turns: a list of turns as it is, a string as one turn of `role` (None: not allowed)."""
    if _is_turns(value):
        return value
    if isinstance(value, list) or role is None:
        raise UserError(f"{rows.where(index)}: '{name}' must be a list of chat turns ({{'role', 'content'}})"
                        f"{'' if role is None else ' or a string'}, got {type(value).__name__}")
    native = {"user": "human", "assistant": "gpt"}[role] if keys[0] == "from" else role
    return [{keys[0]: native, keys[1]: value}]


def _first_difference(a: Turns, b: Turns) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _label(rows: Rows, index: int, value) -> bool:
    """KTO's label: true/false (CSV cells and typed columns: also 'true'/'false', 1/0)."""
    if isinstance(value, bool):
        return value
    key = str(value).strip().lower() if isinstance(value, (int, str)) else None
    if key in _LABELS:
        return _LABELS[key]
    raise UserError(f"{rows.where(index)}: 'label' = {reprlib.repr(value)} is not a KTO label (true for a desirable "
                    f"completion, false for an undesirable one)")
