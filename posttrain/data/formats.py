"""Row dict -> Conversation, one pure function per file format (alpaca, sharegpt, openai, text).

Every error is a DataError naming the row's source ("data.jsonl line 7") and the field, so a
user can open the file at the right place. Column renames and {{variables}} happen here too,
so the rest of the pipeline only ever sees `Conversation`s.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from posttrain.data.images import MEDIA_FIELDS, check_placeholders, image_list, no_vision_message
from posttrain.data.row_context import EMPTY_RESPONSE, RowContext, empty_reason, short
from posttrain.data.tool_calls import function_call_message, parse_tool_call, parse_tools
from posttrain.records import ROLES, Conversation, Message
from posttrain.errors import DataError

FORMATS = ("alpaca", "sharegpt", "openai", "text")

# sharegpt "from" values (and openai roles) -> our roles. "function_call" is not a role: it
# marks an assistant turn whose value is a JSON tool call ({name, arguments}).
DEFAULT_ROLE_TAGS = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system",
    "function_call": "function_call",
    "observation": "tool", "tool": "tool",
}
ROLE_TARGETS = ROLES + ("function_call",)

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def detect_format(columns: Iterable[str], source: str = "") -> str:
    """The format implied by a file's column names (after renames); DataError when none fits."""
    names = set(columns)
    if "messages" in names:
        return "openai"
    if "conversations" in names:
        return "sharegpt"
    if "output" in names and ("instruction" in names or "input" in names):
        return "alpaca"
    if "text" in names:
        return "text"
    where = f"{source}: " if source else ""
    raise DataError(
        f"{where}cannot detect the data format from columns {sorted(names)}; expected 'messages' (openai), "
        "'conversations' (sharegpt), 'instruction'+'output' or 'input'+'output' (alpaca) or 'text'. Set `format` and "
        "`columns` (e.g. columns: {output: answer}) in the dataset config. Each row is one object with such "
        "fields: a .json file holds a JSON array of them ([{...}, {...}]), a .jsonl file one object per line")


def rename_columns(row: Mapping, columns: Mapping[str, str]) -> dict:
    """Apply a dataset's `columns: {our_name: file_column}` map to one row."""
    out = dict(row)
    for ours, theirs in columns.items():
        if theirs in out and theirs != ours:
            out[ours] = out.pop(theirs)
    return out


def fill_variables(text: str, variables: Mapping[str, str]) -> str:
    """Replace {{key}} (spaces allowed inside the braces) by its value; unknown keys stay as they are."""
    if not variables or "{{" not in text:
        return text
    return _PLACEHOLDER.sub(lambda m: str(variables.get(m.group(1), m.group(0))), text)


def row_to_conversation(
    row: Mapping,
    fmt: str,
    *,
    source: str,
    columns: Mapping[str, str] | None = None,
    role_tags: Mapping[str, str] | None = None,
    variables: Mapping[str, str] | None = None,
    images: bool = False,
) -> Conversation:
    """One file row -> Conversation: rename columns, parse `fmt` ('auto' detects), fill {{variables}}.

    images: the model takes images (`images` column, OpenAI image_url parts); otherwise they are an error."""
    columns = columns or {}
    row = rename_columns(row, columns)
    ctx = RowContext(source, columns, images)
    refuse_media(row, ctx)
    if fmt == "auto":
        fmt = detect_format(row.keys(), source)
    if fmt == "alpaca":
        conv = parse_alpaca(row, ctx)
    elif fmt == "sharegpt":
        conv = parse_sharegpt(row, ctx, role_map(role_tags))
    elif fmt == "openai":
        conv = parse_openai(row, ctx, role_map(role_tags))
    elif fmt == "text":
        conv = Conversation(text=ctx.text(row.get("text"), "text", empty="empty_text"))
    else:
        raise DataError(f"{source}: unknown data format {fmt!r}; use one of {', '.join(FORMATS)} or auto")
    conv.source = source
    if images:
        conv.images = ctx.images + image_list(row.get("images"), ctx)
        check_placeholders([m.content for m in conv.messages], conv.images, ctx)
    if variables:
        conv.text = fill_variables(conv.text, variables) if conv.text is not None else None
        for msg in conv.messages:
            msg.content = fill_variables(msg.content, variables)
    return conv


def refuse_media(row: Mapping, ctx: RowContext) -> None:
    """Media the model cannot see is an error: training the text alone would teach replies about pictures (or
    sounds) the model never saw. Images are read when the model has a vision tower; videos and audios never."""
    for name in MEDIA_FIELDS:
        if not row.get(name) or (name == "images" and ctx.images is not None):
            continue
        if name == "images":
            raise ctx.fail(name, no_vision_message("images"))
        raise ctx.fail(name, f"holds {name}, but posttrain trains on text and images only; remove the rows with "
                             f"{name}")


def role_map(role_tags: Mapping[str, str] | None) -> dict[str, str]:
    """The default role tags (user/human/gpt/...) plus a dataset's `role_tags`, each checked."""
    tags = dict(DEFAULT_ROLE_TAGS)
    for tag, role in (role_tags or {}).items():
        if role not in ROLE_TARGETS:
            raise DataError(f"role_tags: {tag!r} -> {role!r}: the target must be one of {', '.join(ROLE_TARGETS)}")
        tags[tag] = role
    return tags


def _role(tag, tags: Mapping[str, str], ctx: RowContext, field: str) -> str:
    if tag not in tags:
        raise ctx.fail(
            field, f"has unknown role {tag!r}; accepted: {', '.join(sorted(tags))}. Map it with `role_tags` "
            f"in the dataset config, e.g. role_tags: {{{tag}: assistant}}")
    return tags[tag]


def _system_first(conv: Conversation, system: str | None) -> Conversation:
    """Prepend a `system` column unless the turns already start with a system message."""
    if system and not (conv.messages and conv.messages[0].role == "system"):
        conv.messages.insert(0, Message("system", system))
    return conv


ALPACA_INPUT_SEPARATOR = "\n"  # joins a list-valued `input` (e.g. sentences to paraphrase)


def parse_alpaca(row: Mapping, ctx: RowContext) -> Conversation:
    """instruction (+ "\\n" + input) -> output, after optional history pairs and system. A list-valued
    input is joined with newlines; a row with input but no instruction has the input as its prompt."""
    value = row.get("input")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ALPACA_INPUT_SEPARATOR.join(value)
    extra = ctx.optional_text(value, "input")
    if extra:
        instruction = ctx.optional_text(row.get("instruction"), "instruction")
        prompt = f"{instruction}\n{extra}" if instruction else extra
    else:
        prompt = ctx.text(row.get("instruction"), "instruction")
    output = ctx.text(row.get("output"), "output", empty=EMPTY_RESPONSE)
    messages = []
    for i, pair in enumerate(row.get("history") or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ctx.fail(f"history[{i}]", f"must be a [user, assistant] pair, got {short(pair)}")
        messages.append(Message("user", ctx.text(pair[0], f"history[{i}][0]")))
        messages.append(Message("assistant", ctx.text(pair[1], f"history[{i}][1]", empty=EMPTY_RESPONSE)))
    messages += [Message("user", prompt), Message("assistant", output)]
    conv = Conversation(messages=messages)
    return _system_first(conv, ctx.optional_text(row.get("system"), "system"))


def parse_sharegpt(row: Mapping, ctx: RowContext, tags: Mapping[str, str]) -> Conversation:
    """conversations: [{from, value}], with optional system and tools columns."""
    messages = []
    for i, turn in enumerate(ctx.items(row.get("conversations"), "conversations")):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise ctx.fail(field, f"must be an object with 'from' and 'value', got {short(turn)}")
        tag = turn.get("from", turn.get("role"))  # some exports use role/content inside sharegpt
        value = turn.get("value", turn.get("content"))
        role = _role(tag, tags, ctx, field + ".from")
        if role == "function_call":
            messages.append(function_call_message(value, ctx, field + ".value"))
        else:
            messages.append(Message(role, ctx.text(value, field + ".value", empty=empty_reason(role))))
    conv = Conversation(messages=messages, tools=parse_tools(row.get("tools"), ctx))
    return _system_first(conv, ctx.optional_text(row.get("system"), "system"))


def parse_openai(row: Mapping, ctx: RowContext, tags: Mapping[str, str]) -> Conversation:
    """messages: [{role, content, loss_weight?, tool_calls?}], with optional tools."""
    messages = []
    for i, raw in enumerate(ctx.items(row.get("messages"), "messages")):
        field = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise ctx.fail(field, f"must be an object with 'role' and 'content', got {short(raw)}")
        role = _role(raw.get("role"), tags, ctx, field + ".role")
        calls = raw.get("tool_calls") or None
        if calls is not None:
            if role not in ("assistant", "function_call") or not isinstance(calls, list):
                raise ctx.fail(field + ".tool_calls", "must be a list, on an assistant message")
            calls = [parse_tool_call(c, ctx, f"{field}.tool_calls[{j}]") for j, c in enumerate(calls)]
            role = "assistant"
        elif role == "function_call":
            messages.append(function_call_message(raw.get("content"), ctx, field + ".content"))
            continue
        content = raw.get("content")
        if calls and content is None:  # OpenAI sends content: null beside tool_calls
            content = ""
        content = ctx.text(content, field + ".content", allow_empty=calls is not None, empty=empty_reason(role))
        weight = _weight(raw.get("loss_weight"), ctx, field)
        messages.append(Message(role, content, loss_weight=weight, tool_calls=calls))
    return Conversation(messages=messages, tools=parse_tools(row.get("tools"), ctx))


def _weight(value, ctx: RowContext, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ctx.fail(field + ".loss_weight", f"must be a number >= 0, got {short(value)}")
    return float(value)
