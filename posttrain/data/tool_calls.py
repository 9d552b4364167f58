"""Tool definitions (`tools`) and tool calls in chat rows, normalised to what HF chat templates render."""

from __future__ import annotations

import json

from posttrain.data.row_context import RowContext, short
from posttrain.records import Message


def _drop_nulls(value):
    """Drop None entries from dicts: Arrow gives every struct the union of all rows' keys."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def parse_tools(value, ctx: RowContext) -> list[dict] | None:
    """`tools` as a JSON string or a list of function schemas; empty means none."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ctx.fail("tools", f"is not valid JSON: {err.msg}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ctx.fail("tools", f"must be a list of function schemas, got {short(value)}")
    return _drop_nulls(value) or None


def parse_tool_call(call, ctx: RowContext, field: str) -> dict:
    """Normalise one call to {"type": "function", "function": {"name", "arguments": dict}}.

    Arguments become a dict when given as a JSON string: HF chat templates render them with
    `tojson`, which would quote a string a second time.
    """
    if not isinstance(call, dict):
        raise ctx.fail(field, f"must be an object with name and arguments, got {short(call)}")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ctx.fail(field, "needs a string 'name'")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise ctx.fail(field + ".arguments", f"is not valid JSON: {err.msg}") from None
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def function_call_message(value, ctx: RowContext, field: str) -> Message:
    """A sharegpt function_call turn: JSON {name, arguments} (or a list of them for parallel calls)."""
    if isinstance(value, str):
        try:
            value = json.loads(ctx.text(value, field))
        except json.JSONDecodeError as err:
            raise ctx.fail(field, f"is not valid JSON {{name, arguments}}: {err.msg}") from None
    calls = value if isinstance(value, list) else [value]
    tool_calls = [parse_tool_call(c, ctx, f"{field}[{i}]" if len(calls) > 1 else field) for i, c in enumerate(calls)]
    return Message("assistant", "", tool_calls=tool_calls)
