import pytest

from kiln.records import RecordError, detect_format, stable_id, to_canonical


@pytest.mark.parametrize(
    "record, fmt, turns",
    [
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "messages",
            [("user", "a"), ("assistant", "b")],
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "s"},
                    {"from": "human", "value": "a"},
                    {"from": "gpt", "value": "b"},
                ]
            },
            "sharegpt",
            [("system", "s"), ("user", "a"), ("assistant", "b")],
        ),
        (
            {"instruction": "do", "input": "this", "output": "done"},
            "alpaca",
            [("user", "do\n\nthis"), ("assistant", "done")],
        ),
        ({"instruction": "do", "input": "", "output": "done"}, "alpaca", [("user", "do"), ("assistant", "done")]),
        ({"prompt": "p", "completion": "c"}, "prompt_completion", [("user", "p"), ("assistant", "c")]),
        ({"text": "plain"}, "text", [("text", "plain")]),
    ],
)
def test_formats_map_to_canonical_turns(record, fmt, turns):
    got_fmt, kind, got = to_canonical(record)
    assert got_fmt == fmt
    assert kind == ("text" if fmt == "text" else "chat")
    assert [(t["role"], t["content"]) for t in got] == turns


def test_column_mapping():
    fmt, _, turns = to_canonical(
        {"question": "q", "answer": "a"}, "auto", {"prompt": "question", "completion": "answer"}
    )
    assert fmt == "prompt_completion" and turns[1]["content"] == "a"


@pytest.mark.parametrize(
    "record, field",
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"instruction": "x", "output": None}, "output"),
        ({"prompt": "p", "completion": 5}, "completion"),
        ({"foo": 1}, "(record)"),
    ],
)
def test_bad_records_name_the_field(record, field):
    with pytest.raises(RecordError) as err:
        to_canonical(record)
    assert err.value.field == field


def test_detect_format_message_lists_the_keys_found():
    with pytest.raises(RecordError, match=r"keys \['a', 'b'\]"):
        detect_format({"a": 1, "b": 2}, {})


def test_stable_id_depends_on_content_only():
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert stable_id("chat", turns) == stable_id("chat", [dict(t) for t in turns])
    assert stable_id("chat", turns) != stable_id("chat", turns[:1])
    assert len(stable_id("chat", turns)) == 16


def test_openai_content_parts_are_joined_and_other_parts_named():
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    _, _, turns = to_canonical(
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "hi"}]}
    )
    assert turns[0]["content"] == "Hello, world"
    image = [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(RecordError, match=r"content part of type 'image_url' is not supported") as err:
        to_canonical({"messages": [{"role": "user", "content": image}]})
    assert err.value.field == "messages[0].content[1]"


def test_a_null_field_is_called_null_not_missing():
    with pytest.raises(RecordError, match="field 'output': is null"):
        to_canonical({"instruction": "x", "output": None})
    with pytest.raises(RecordError, match="field 'output': missing"):
        to_canonical({"instruction": "x"}, "alpaca")
    with pytest.raises(RecordError, match="messages\\[0\\].content': is null"):
        to_canonical({"messages": [{"role": "user", "content": None}]})
