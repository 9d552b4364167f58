"""`posttrain data convert`: alpaca <-> sharegpt <-> openai messages, reporting what cannot be carried.

Rows are parsed by the spine's parser into a Conversation, then written back out. Columns the
formats do not own (ids, user ids, sources) pass through unchanged. A row the target format
cannot hold (tool calls in alpaca) is rejected to a side file with the reason; a field that
is lost (per-turn loss_weight outside openai) is counted in the report, and so are alpaca rows
the parser reshaped: a list-valued `input` (joined with a newline) and a row with `input` but
no `instruction` (the input becomes the prompt).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from posttrain.curate.stream import RowPass, reason_of
from posttrain.data.formats import ALPACA_INPUT_SEPARATOR
from posttrain.data.policy import ContentProblem
from posttrain.records import Conversation
from posttrain.errors import DataError

TARGETS = ("alpaca", "sharegpt", "openai")
# Columns owned by each input format: everything else is metadata and passes through.
FORMAT_COLUMNS = {"instruction", "input", "output", "history", "system", "conversations", "messages", "tools", "text"}
SHAREGPT_TAGS = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}


class CannotCarry(Exception):
    """The target format has no place for part of this conversation (message says what)."""


def to_alpaca(conv: Conversation, lost: Counter) -> dict:
    msgs = list(conv.messages)
    if conv.text is not None:
        raise CannotCarry("plain text rows have no instruction/output")
    if conv.tools or any(m.tool_calls or m.role == "tool" for m in msgs):
        raise CannotCarry("alpaca cannot hold tools, tool calls or tool results")
    row: dict = {}
    if msgs and msgs[0].role == "system":
        row["system"] = msgs.pop(0).content
    roles = [m.role for m in msgs]
    if len(msgs) < 2 or len(msgs) % 2 or roles != ["user", "assistant"] * (len(msgs) // 2):
        raise CannotCarry(f"alpaca needs alternating user/assistant turns, got {roles}")
    _count_weights(msgs, lost)
    row["instruction"], row["input"], row["output"] = msgs[-2].content, "", msgs[-1].content
    if len(msgs) > 2:
        row["history"] = [[msgs[i].content, msgs[i + 1].content] for i in range(0, len(msgs) - 2, 2)]
    return row


def to_sharegpt(conv: Conversation, lost: Counter) -> dict:
    if conv.text is not None:
        raise CannotCarry("plain text rows have no conversation")
    turns = []
    _count_weights(conv.messages, lost)
    for m in conv.messages:
        if m.tool_calls:
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m.tool_calls]
            if m.content:
                lost["assistant text beside tool calls"] += 1
            turns.append({"from": "function_call", "value": json.dumps(calls[0] if len(calls) == 1 else calls)})
        else:
            turns.append({"from": SHAREGPT_TAGS[m.role], "value": m.content})
    row: dict = {"conversations": turns}
    if conv.tools:
        row["tools"] = json.dumps(conv.tools)
    return row


def to_openai(conv: Conversation, lost: Counter) -> dict:
    if conv.text is not None:
        raise CannotCarry("plain text rows have no messages")
    messages = []
    for m in conv.messages:
        msg: dict = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.loss_weight is not None:
            msg["loss_weight"] = m.loss_weight
        messages.append(msg)
    row: dict = {"messages": messages}
    if conv.tools:
        row["tools"] = conv.tools
    return row


def _count_weights(messages, lost: Counter) -> None:
    if any(m.loss_weight is not None for m in messages):
        lost["per-turn loss_weight"] += 1


WRITERS = {"alpaca": to_alpaca, "sharegpt": to_sharegpt, "openai": to_openai}


def conversation_to_row(conv: Conversation, to: str, lost: Counter, extra: dict | None = None) -> dict:
    """Conversation (+ pass-through columns) -> a row in format `to`; CannotCarry when impossible."""
    if to not in WRITERS:
        raise DataError(f"unknown target format {to!r}; use one of {', '.join(TARGETS)}")
    row = WRITERS[to](conv, lost)
    for key, value in (extra or {}).items():
        row.setdefault(key, value)
    return row


def metadata(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in FORMAT_COLUMNS}


def _reshaped(row: dict, fmt: str, counts: Counter) -> None:
    """Count what parse_alpaca changed in the row's shape (the report says so; nothing is silent)."""
    if fmt != "alpaca":
        return
    if isinstance(row.get("input"), list):
        counts[f"list-valued input joined with {ALPACA_INPUT_SEPARATOR!r}"] += 1
    if not row.get("instruction") and row.get("input"):
        counts["no instruction: the input is the prompt"] += 1


def convert(path: str | Path, out: str | Path, to: str, fmt: str = "auto", skip_bad: bool = False,
            strict: bool = False) -> dict:
    """Convert one file; returns a report {rows, written, rejected: {reason: n}, lost: {field: n}}.

    A row with a content problem (data/policy.py) is rejected under its reason, or fatal when strict."""
    if to not in WRITERS:
        raise DataError(f"unknown target format {to!r}; use one of {', '.join(TARGETS)}")
    lost, rejected, reshaped = Counter(), Counter(), Counter()
    with RowPass(path, out, fmt, "convert") as rows:
        for source, row in rows:
            try:
                conv = rows.parse(row, source)
                rows.writer.write(conversation_to_row(conv, to, lost, metadata(row)))
                _reshaped(row, rows.parse.fmt, reshaped)
            except CannotCarry as err:
                rejected[str(err)] += 1
                rows.rejects.write({"source": source, "reason": str(err), "row": row})
            except ContentProblem as problem:
                rows.reject(rejected, problem, strict, source, row)
            except DataError as err:
                if not skip_bad:
                    raise
                rejected[reason_of(err, source)] += 1
                rows.rejects.write({"source": source, "reason": str(err), "row": row})
    rejects = rows.rejects
    return {"rows": rows.rows, "written": rows.writer.count, "rejected": dict(rejected), "lost": dict(lost),
            "reshaped": dict(reshaped), "out": str(out), "rejected_file": str(rejects.path) if rejects.count else None}
