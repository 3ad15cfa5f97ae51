"""Format detection, conversion to the common form, turn normalisation, and missing-field errors."""

import pytest

from finetune.data import Chat, Plain, convert, detect_format, read_rows
from finetune.data.formats import resolve_format
from finetune.data.report import SourceStats
from quant.errors import UserError

ROWS = {
    "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "alpaca": {"instruction": "Say hello.", "input": "to Anna", "output": "Hello Anna"},
    "completion": {"prompt": "2+2=", "completion": " 4"},
    "text": {"text": "Once upon a time."},
}


def _rows(write_jsonl, rows):
    return read_rows(write_jsonl(rows))


@pytest.mark.parametrize("fmt", list(ROWS))
def test_auto_detects_each_format_and_says_why(write_jsonl, fmt):
    rows = _rows(write_jsonl, [ROWS[fmt]])
    found, reason = detect_format(rows)
    assert found == fmt
    assert reason.startswith("auto: column")
    items = convert(rows, fmt, SourceStats("x"))
    assert len(items) == 1


def test_conversions_to_the_common_form(write_jsonl):
    expected = {
        "chat": Chat(0, [("user", "hi"), ("assistant", "hello")]),
        "sharegpt": Chat(0, [("user", "hi"), ("assistant", "hello")]),
        "alpaca": Chat(0, [("user", "Say hello.\n\nto Anna"), ("assistant", "Hello Anna")]),
        "completion": Plain(0, [("2+2=", False), (" 4", True)]),
        "text": Plain(0, [("Once upon a time.", True)]),
    }
    for fmt, item in expected.items():
        assert convert(_rows(write_jsonl, [ROWS[fmt]]), fmt, SourceStats("x")) == [item]


def test_detection_reads_turn_keys_not_just_column_names(write_jsonl):
    role_content = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert detect_format(_rows(write_jsonl, [role_content]))[0] == "chat"
    from_value = {"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert detect_format(_rows(write_jsonl, [from_value]))[0] == "sharegpt"
    # A chat column wins over a stray text column, whatever the order.
    assert detect_format(_rows(write_jsonl, [{"text": "x", **ROWS["chat"]}]))[0] == "chat"


def test_undetectable_columns_are_a_user_error(write_jsonl):
    with pytest.raises(UserError, match=r"cannot detect the data format from columns \['answer', 'question'\]"):
        detect_format(_rows(write_jsonl, [{"question": "q", "answer": "a"}]))
    assert resolve_format("alpaca", _rows(write_jsonl, [ROWS["alpaca"]])) == ("alpaca", "set in the recipe")


def test_sharegpt_roles_are_mapped_and_every_repair_is_counted(write_jsonl):
    def conv(*turns):
        return {"conversations": [{"from": f, "value": v} for f, v in turns]}

    rows = _rows(write_jsonl, [
        conv(("system", "be brief"), ("human", "q1"), ("bing", "a1"), ("user", "q2"), ("chatgpt", "a2")),
        conv(("gpt", "answer to a lost question"), ("human", "q"), ("bard", "a")),  # split conversation
        conv(("human", "q"), ("tool", "{json}"), ("human", "more"), ("gpt", "a"), ("human", "unanswered")),
        conv(("human", "q"), ("gpt", "   "), ("gpt", "a")),  # empty turn, then the answer
        conv(("human", "q"), ("gpt", "a"), ("system", "late"), ("GPT", "a2")),
        conv(("human", "only a question")),
        conv(),
    ])
    stats = SourceStats("x")
    items = convert(rows, "sharegpt", stats)
    assert [item.turns for item in items] == [
        [("system", "be brief"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")],
        [("user", "q"), ("assistant", "a")],
        [("user", "q\n\nmore"), ("assistant", "a")],
        [("user", "q"), ("assistant", "a")],
        [("user", "q"), ("assistant", "a\n\na2")],
    ]
    assert [item.row for item in items] == [0, 1, 2, 3, 4]
    assert stats.rows_read == 7 and stats.rows_kept == 5
    assert stats.dropped == {"no assistant turn": 1, "no turns": 1}
    assert stats.roles_mapped == {"bing->assistant": 1, "user->user": 1, "chatgpt->assistant": 1,
                                  "bard->assistant": 1, "GPT->assistant": 1}
    assert stats.unknown_roles == {"tool": 1}
    assert stats.turn_fixes == {
        "leading assistant turns dropped": 1, "consecutive same-role turns merged": 2, "empty turns dropped": 1,
        "trailing turns without an answer dropped": 2, "system turns after the start dropped": 1,
    }


def test_chat_content_parts_and_empty_rows(write_jsonl):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "c"}]}
    items = convert(_rows(write_jsonl, [parts]), "chat", SourceStats("x"))
    assert items[0].turns == [("user", "a\nb"), ("assistant", "c")]
    image = {"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]}
    with pytest.raises(UserError, match=r"row 0 \(line 1\): messages\[0\]\.content has non-text parts \['image'\]"):
        convert(_rows(write_jsonl, [image]), "chat", SourceStats("x"))
    stats = SourceStats("x")
    rows = [{"instruction": "i", "output": " "}, {"prompt": "p", "completion": ""}, {"text": "\n"}]
    assert convert(_rows(write_jsonl, rows[:1]), "alpaca", stats) == []
    assert convert(_rows(write_jsonl, rows[1:2]), "completion", stats) == []
    assert convert(_rows(write_jsonl, rows[2:]), "text", stats) == []
    assert stats.dropped == {"empty output": 1, "empty completion": 1, "empty text": 1}


@pytest.mark.parametrize("fmt, row, message", [
    ("chat", {"text": "x"}, r"row 1 \(line 2\): missing field 'messages' \(chat rows need 'messages'"),
    ("chat", {"messages": [{"role": "user"}]}, r"row 1 \(line 2\): messages\[0\] has no 'content'"),
    ("chat", {"messages": [{"content": "x"}]}, r"row 1 \(line 2\): messages\[0\] has no 'role'"),
    ("chat", {"messages": "hello"}, r"row 1 \(line 2\): field 'messages' must be a list of turns, got str"),
    ("sharegpt", {"conversations": [{"from": "human"}]}, r"row 1 \(line 2\): conversations\[0\] has no 'value'"),
    ("alpaca", {"instruction": "x"}, r"row 1 \(line 2\): missing field 'output' \(alpaca rows need"),
    ("alpaca", {"instruction": "x", "output": {"a": 1}}, r"row 1 \(line 2\): field 'output' must be a string"),
    ("completion", {"prompt": "x", "completion": None}, r"row 1 \(line 2\): missing field 'completion'"),
    ("text", {"body": "x"}, r"row 1 \(line 2\): missing field 'text' \(text rows need 'text'\)"),
])
def test_row_missing_its_field_names_row_and_field(write_jsonl, fmt, row, message):
    path = write_jsonl([ROWS[fmt], row])
    with pytest.raises(UserError, match=message) as info:
        convert(read_rows(path), fmt, SourceStats(path))
    assert str(info.value).startswith(path) and "\n" not in str(info.value)
