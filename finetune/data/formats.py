"""Rows of chat / sharegpt / alpaca / completion / text data -> one common form.

Two shapes cover every format: `Chat` (role/content turns, rendered later by a chat template) and `Plain`
(text pieces, each trained on or not, concatenated without any template). Conversations are normalised here so
that any chat template can render them: roles mapped to system/user/assistant, empty and unknown-role turns
dropped, consecutive same-role turns merged, and the result is `[system] user assistant user assistant ...`
ending in an assistant turn. Every repair is counted in the source's `SourceStats`.

A field that a format needs and that is absent (or null) in a row is the user's to fix: `UserError` naming the
row and the field. An empty value is data, not a mistake: the row or turn is dropped and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from quant import records
from quant.errors import UserError
from quant.records import FORMATS, NEEDS, ROLE_MAP

from .report import SourceStats
from .sources import Rows

# Roles each format names natively; any other mapped role counts as "unusual" in the report.
NATIVE_ROLES = {"chat": {"system", "user", "assistant"}, "sharegpt": {"system", "human", "gpt"}}


@dataclass
class Chat:
    row: int
    turns: list[tuple[str, str]]  # (role, content), role in system/user/assistant, normalised as above


@dataclass
class Plain:
    row: int
    parts: list[tuple[str, bool]]  # (text, trained on); the tokenizer stage appends EOS


Item = Union[Chat, Plain]


# ---------------------------------------------------------------------------------------------- detection


def detect_format(rows: Rows) -> tuple[str, str]:
    """Pick a format from the column names (and the shape of the turns); return it and the reason, for the report."""
    return records.detect_format(rows.columns, rows, rows.source)


def resolve_format(requested: str, rows: Rows) -> tuple[str, str]:
    if requested == "auto":
        return detect_format(rows)
    if requested not in FORMATS:
        raise UserError(f"data.format = '{requested}' is not one of auto, {', '.join(FORMATS)}")
    return requested, "set in the recipe"


# ---------------------------------------------------------------------------------------------- conversion


def convert(rows: Rows, fmt: str, stats: SourceStats) -> list[Item]:
    """Every row of `rows` as a Chat or Plain item; dropped rows are counted in `stats`, not returned."""
    convert_row = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca,
                   "completion": _completion, "text": _text}[fmt]
    return convert_rows(rows, convert_row, stats)


def convert_rows(rows: Rows, convert_row, stats: SourceStats) -> list:
    """`convert_row(rows, index, row, stats)` of every row, counted in `stats`; a _BadValue drops the row."""
    items = []
    for index, row in enumerate(rows):
        stats.rows_read += 1
        try:
            item = convert_row(rows, index, row, stats)
        except _BadValue as bad:
            stats.drop(str(bad))
            continue
        if item is not None:
            items.append(item)
    stats.rows_kept = len(items)
    return items


def _field(rows: Rows, index: int, row: dict, name: str, fmt: str):
    value = row.get(name)
    if value is None:
        raise UserError(f"{rows.where(index)}: missing field '{name}' ({fmt} rows need {NEEDS[fmt]})")
    return value


class _BadValue(Exception):
    """A value that is there but cannot be text (NaN, a lone surrogate): the row is dropped and counted."""


def _text_value(rows: Rows, index: int, value, what: str) -> str:
    """Strings pass; numbers become text (CSV columns are often typed); OpenAI-style part lists are joined.

    NaN/Infinity (a JSON file with NaN literals, a float column with gaps) would train on the text "nan", and
    a lone surrogate cannot be encoded for the tokenizer: such rows are dropped with their reason."""
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadValue("invalid Unicode (a lone surrogate) in a text field") from None
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise _BadValue("NaN or Infinity where text was expected")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = {p.get("type", "text") for p in value}
        if kinds <= {"text"}:
            return "\n".join(_text_value(rows, index, p.get("text"), what) for p in value)
        raise UserError(f"{rows.where(index)}: {what} has non-text parts {sorted(kinds - {'text'})}; "
                        f"only text content is supported")
    raise UserError(f"{rows.where(index)}: {what} must be a string, got {type(value).__name__}")


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _turn_list(rows: Rows, index: int, row: dict, fmt: str, preferred: str, other: str) -> tuple[str, list]:
    col = preferred if row.get(preferred) is not None or other not in row else other
    turns = _field(rows, index, row, col, fmt)
    if not isinstance(turns, list):
        raise UserError(f"{rows.where(index)}: field '{col}' must be a list of turns, got {type(turns).__name__}")
    return col, turns


def _chat(rows: Rows, index: int, row: dict, stats: SourceStats) -> Chat | None:
    col, turns = _turn_list(rows, index, row, "chat", "messages", "conversations")
    return _conversation(rows, index, turns, col, "chat", "role", "content", stats)


def _sharegpt(rows: Rows, index: int, row: dict, stats: SourceStats) -> Chat | None:
    col, turns = _turn_list(rows, index, row, "sharegpt", "conversations", "messages")
    return _conversation(rows, index, turns, col, "sharegpt", "from", "value", stats)


def _conversation(rows: Rows, index: int, raw_turns: list, col: str, fmt: str, role_key: str, content_key: str,
                  stats: SourceStats) -> Chat | None:
    turns: list[tuple[str, str]] = []
    for j, turn in enumerate(raw_turns):
        where = f"{col}[{j}]"
        if not isinstance(turn, dict):
            raise UserError(f"{rows.where(index)}: {where} must be an object with '{role_key}' and "
                            f"'{content_key}', got {type(turn).__name__}")
        raw_role = turn.get(role_key)
        if raw_role is None:
            raise UserError(f"{rows.where(index)}: {where} has no '{role_key}' ({fmt} rows need {NEEDS[fmt]})")
        if content_key not in turn:
            raise UserError(f"{rows.where(index)}: {where} has no '{content_key}' ({fmt} rows need {NEEDS[fmt]})")
        label = str(raw_role).strip()
        role = ROLE_MAP.get(label.lower())
        if role is None:
            # Tool calls, function results and invented speaker names have no place in a plain chat
            # template; dropping the turn keeps the rest of the conversation usable.
            stats.unknown_roles[_printable(label) or "(empty)"] += 1
            continue
        if label not in NATIVE_ROLES[fmt]:
            stats.roles_mapped[f"{label}->{role}"] += 1
        content = _text_value(rows, index, turn.get(content_key), f"{where}.{content_key}")
        if not content.strip():
            stats.turn_fixes["empty turns dropped"] += 1
            continue
        turns.append((role, content))
    turns = _normalise(turns, stats)
    if not any(role == "assistant" for role, _ in turns):
        stats.drop("no assistant turn" if raw_turns else "no turns")
        return None
    return Chat(index, turns)


def _normalise(turns: list[tuple[str, str]], stats: SourceStats) -> list[tuple[str, str]]:
    """Shape turns into [system] (user assistant)+ so that strict templates (which raise on anything else) render."""
    out: list[tuple[str, str]] = []
    for role, content in turns:
        if role == "system" and out:
            # Most templates accept a system message only first; a mid-conversation one is usually a dump artefact.
            stats.turn_fixes["system turns after the start dropped"] += 1
            continue
        if out and out[-1][0] == role:
            out[-1] = (role, out[-1][1] + "\n\n" + content)
            stats.turn_fixes["consecutive same-role turns merged"] += 1
            continue
        out.append((role, content))
    first = 1 if out and out[0][0] == "system" else 0
    # A conversation split mid-way (common in ShareGPT) starts with an answer to a question we do not have.
    # Roles alternate after the merge above, so one pop leaves a user turn first.
    if len(out) > first and out[first][0] == "assistant":
        out.pop(first)
        stats.turn_fixes["leading assistant turns dropped"] += 1
    # Turns after the last answer teach nothing: there is no response to train on.
    while out and out[-1][0] != "assistant":
        out.pop()
        stats.turn_fixes["trailing turns without an answer dropped"] += 1
    return out


def _alpaca(rows: Rows, index: int, row: dict, stats: SourceStats) -> Chat | None:
    instruction = _text_value(rows, index, _field(rows, index, row, "instruction", "alpaca"), "field 'instruction'")
    output = _text_value(rows, index, _field(rows, index, row, "output", "alpaca"), "field 'output'")
    extra = _text_value(rows, index, row.get("input"), "field 'input'")
    prompt = "\n\n".join(p for p in (instruction.strip(), extra.strip()) if p)
    if not prompt:
        stats.drop("empty instruction and input")
        return None
    if not output.strip():
        stats.drop("empty output")
        return None
    return Chat(index, [("user", prompt), ("assistant", output)])


def _completion(rows: Rows, index: int, row: dict, stats: SourceStats) -> Plain | None:
    prompt = _text_value(rows, index, _field(rows, index, row, "prompt", "completion"), "field 'prompt'")
    completion = _text_value(rows, index, _field(rows, index, row, "completion", "completion"), "field 'completion'")
    if not completion.strip():
        stats.drop("empty completion")
        return None
    return Plain(index, [(prompt, False), (completion, True)])


def _text(rows: Rows, index: int, row: dict, stats: SourceStats) -> Plain | None:
    text = _text_value(rows, index, _field(rows, index, row, "text", "text"), "field 'text'")
    if not text.strip():
        stats.drop("empty text")
        return None
    return Plain(index, [(text, True)])
