"""Row dict -> Conversation for each format; every error names source, field and the fix."""

import pytest

from posttrain.data.formats import detect_format, fill_variables, row_to_conversation
from posttrain.data.policy import ContentProblem
from posttrain.records import Conversation, Message
from posttrain.errors import DataError

SRC = "data.jsonl line 7"


def convert(row, fmt="auto", **kw) -> Conversation:
    return row_to_conversation(row, fmt, source=SRC, **kw)


def roles(conv):
    return [(m.role, m.content) for m in conv.messages]


# ---------------------------------------------------------------- alpaca


def test_alpaca_joins_input_and_keeps_history_and_system():
    conv = convert({
        "instruction": "Translate", "input": "bonjour", "output": "hello", "system": "Be brief.",
        "history": [["hi", "hey"], ["how are you?", "fine"]],
    })
    assert roles(conv) == [
        ("system", "Be brief."), ("user", "hi"), ("assistant", "hey"), ("user", "how are you?"),
        ("assistant", "fine"), ("user", "Translate\nbonjour"), ("assistant", "hello"),
    ]
    assert conv.source == SRC


def test_alpaca_optional_fields_may_be_null_or_empty():
    conv = convert({"instruction": "Say hi", "input": None, "output": "hi", "system": "", "history": None}, "alpaca")
    assert roles(conv) == [("user", "Say hi"), ("assistant", "hi")]


@pytest.mark.parametrize("output, problem", [(None, "is missing/empty"), ("", r"is empty \[empty_response\]"),
                                             (" \n", r"is empty \[empty_response\]")])
def test_alpaca_missing_output_names_line_and_field(output, problem):
    row = {"instruction": "x", "output": output}
    with pytest.raises(DataError, match=rf"data\.jsonl line 7: field 'output' {problem}") as err:
        convert(row, "alpaca")
    assert isinstance(err.value, ContentProblem) == (output is not None)  # blank: content; missing: structural


def test_alpaca_renamed_column_is_named_too():
    conv = convert({"instruction": "q", "answer": "a"}, columns={"output": "answer"})
    assert roles(conv)[-1] == ("assistant", "a")
    with pytest.raises(DataError, match=r"field 'output' \(column 'answer'\) is empty"):
        convert({"instruction": "q", "answer": ""}, "alpaca", columns={"output": "answer"})


def test_alpaca_bad_history_pair():
    with pytest.raises(DataError, match=r"line 7: field 'history\[0\]' must be a \[user, assistant\] pair"):
        convert({"instruction": "q", "output": "a", "history": [["only one"]]}, "alpaca")


# ---------------------------------------------------------------- sharegpt


def test_sharegpt_default_tags_system_column_and_tool_calls():
    row = {
        "system": "You can call tools.",
        "tools": '[{"name": "weather", "parameters": {"type": "object"}}]',
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
        ],
    }
    conv = convert(row)
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = conv.messages[2]
    assert call.content == ""
    assert call.tool_calls == [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]
    assert conv.tools == [{"name": "weather", "parameters": {"type": "object"}}]


def test_sharegpt_string_arguments_become_a_dict_and_tools_may_be_a_list():
    row = {"conversations": [
        {"from": "user", "value": "go"},
        {"from": "function_call", "value": '{"name": "f", "arguments": "{\\"x\\": 1}"}'},
    ], "tools": [{"name": "f", "parameters": None}]}
    conv = convert(row, "sharegpt")
    assert conv.messages[1].tool_calls[0]["function"]["arguments"] == {"x": 1}
    assert conv.tools == [{"name": "f"}]  # Arrow's null-filled keys are dropped


def test_sharegpt_role_tags_extend_defaults():
    row = {"conversations": [{"from": "me", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    conv = convert(row, role_tags={"me": "user", "bot": "assistant"})
    assert roles(conv) == [("user", "hi"), ("assistant", "hello")]


def test_sharegpt_unknown_role_says_how_to_map_it():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    with pytest.raises(DataError) as err:
        convert(row)
    msg = str(err.value)
    assert "data.jsonl line 7" in msg and "conversations[1].from" in msg and "'bot'" in msg
    assert "gpt" in msg and "human" in msg  # the accepted tags are listed
    assert "role_tags" in msg and "bot: assistant" in msg


def test_sharegpt_bad_function_call_json():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{oops"}]}
    with pytest.raises(DataError, match=r"line 7: field 'conversations\[1\]\.value' is not valid JSON"):
        convert(row)


def test_sharegpt_non_string_value():
    row = {"conversations": [{"from": "human", "value": 42}]}
    with pytest.raises(DataError, match=r"line 7: field 'conversations\[0\]\.value' must be a string, got int"):
        convert(row)


def test_sharegpt_empty_conversations():
    with pytest.raises(DataError, match="field 'conversations' is missing/empty"):
        convert({"conversations": []}, "sharegpt")


# ---------------------------------------------------------------- openai


def test_openai_loss_weight_tool_calls_and_null_content():
    row = {"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "draft", "loss_weight": 0.0},
        {"role": "assistant", "content": None, "loss_weight": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "done", "loss_weight": 2},
    ], "tools": [{"type": "function", "function": {"name": "f"}}]}
    conv = convert(row)
    assert [m.loss_weight for m in conv.messages] == [None, None, 0.0, None, None, 2.0]
    assert conv.messages[3] == Message("assistant", "", tool_calls=[
        {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}])
    assert conv.tools == [{"type": "function", "function": {"name": "f"}}]


def test_openai_text_parts_are_joined():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert roles(convert(row)) == [("user", "ab")]


def test_openai_unknown_role_and_bad_content():
    with pytest.raises(DataError, match=r"line 7: field 'messages\[0\]\.role' has unknown role 'bot'.*role_tags"):
        convert({"messages": [{"role": "bot", "content": "x"}]})
    with pytest.raises(DataError, match=r"field 'messages\[0\]\.content' must be a string, got dict"):
        convert({"messages": [{"role": "user", "content": {"text": "x"}}]})
    with pytest.raises(DataError, match=r"field 'messages\[1\]\.content' is missing/empty"):
        convert({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]})
    with pytest.raises(DataError, match=r"field 'messages\[0\]\.loss_weight' must be a number >= 0"):
        convert({"messages": [{"role": "assistant", "content": "x", "loss_weight": "high"}]})


def test_openai_role_tags_apply_too():
    conv = convert({"messages": [{"role": "bot", "content": "x"}]}, role_tags={"bot": "assistant"})
    assert roles(conv) == [("assistant", "x")]


def test_bad_role_tags_target():
    with pytest.raises(DataError, match="role_tags: 'bot' -> 'robot'"):
        convert({"messages": [{"role": "bot", "content": "x"}]}, role_tags={"bot": "robot"})


# ---------------------------------------------------------------- text, detection, variables


def test_text_format():
    conv = convert({"text": "Once upon a time"})
    assert conv.text == "Once upon a time" and conv.messages == []
    with pytest.raises(DataError, match=r"line 7: field 'text' is empty \[empty_text\]"):
        convert({"text": ""}, "text")


@pytest.mark.parametrize("columns, fmt", [
    (["messages", "tools"], "openai"),
    (["conversations", "system"], "sharegpt"),
    (["instruction", "input", "output"], "alpaca"),
    (["text", "meta"], "text"),
])
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


def test_detect_format_failure_suggests_columns():
    with pytest.raises(DataError, match=r"data\.csv: cannot detect.*\['prompt', 'response'\].*columns"):
        detect_format(["prompt", "response"], "data.csv")


def test_variables_fill_every_content():
    variables = {"name": "Aria", "author": "Lab"}
    conv = convert({"instruction": "Who is {{name}}?", "output": "I am {{ name }}, made by {{author}}. {{other}}",
                    "system": "You are {{name}}."}, variables=variables)
    assert roles(conv) == [("system", "You are Aria."), ("user", "Who is Aria?"),
                           ("assistant", "I am Aria, made by Lab. {{other}}")]
    assert convert({"text": "{{name}}!"}, variables=variables).text == "Aria!"
    assert fill_variables("no braces", variables) == "no braces"
