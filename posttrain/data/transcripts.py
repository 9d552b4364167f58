"""Anthropic hh-rlhf's raw layout: `chosen` / `rejected` as whole "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts.

Each transcript is split into turns at its speaker markers; the turns both sides share are the
prompt, and each side's final assistant turn is its response. Only a marker after a blank line
(or at the very start) begins a turn, so "Human:" inside a reply stays text, as it is in the data.
Consecutive turns of one speaker are one turn (the data has replies split by a repeated
"Assistant:"). Rows whose prompts differ, that end on a human turn, or whose final reply is
empty are content problems (data/policy.py): dropped and counted unless data.strict.
"""

from __future__ import annotations

import re

from posttrain.data.row_context import EMPTY_RESPONSE, RowContext
from posttrain.records import Message

SPEAKERS = {"Human": "user", "Assistant": "assistant"}
_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")


def is_transcript(value) -> bool:
    """True for a string that starts with a Human: or Assistant: marker (after optional whitespace)."""
    return isinstance(value, str) and _MARKER.match(value) is not None


def split_transcript(text: str, ctx: RowContext, field: str) -> list[Message]:
    """One transcript -> messages (user / assistant), turn texts stripped, same-speaker runs merged."""
    if not isinstance(text, str):
        raise ctx.fail(field, f"must be a transcript string like the other side, got {type(text).__name__}")
    if not is_transcript(text):
        raise ctx.fail(field, f"is a string but not a Human/Assistant transcript (expected '\\n\\nHuman: ... "
                              f"\\n\\nAssistant: ...'); plain-string responses need a `prompt` column: {text[:40]!r}")
    parts = _MARKER.split(text)  # ['', speaker, text, speaker, text, ...]
    messages: list[Message] = []
    for speaker, body in zip(parts[1::2], parts[2::2]):
        role, body = SPEAKERS[speaker], body.strip()
        if messages and messages[-1].role == role:
            messages[-1].content = f"{messages[-1].content}\n\n{body}".strip()
        else:
            messages.append(Message(role, body))
    return messages


def transcript_pair(chosen: str, rejected: str, ctx: RowContext) -> tuple[list[Message], Message, Message]:
    """(prompt, chosen reply, rejected reply) of an hh-rlhf row; a ContentProblem when it has none."""
    sides = {"chosen": split_transcript(chosen, ctx, "chosen"), "rejected": split_transcript(rejected, ctx, "rejected")}
    a, b = sides.values()
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    for name, turns in sides.items():
        if turns[-1].role != "assistant":
            raise ctx.problem("no_final_reply", name, "ends with a Human turn, not an Assistant reply")
        if len(turns) != n + 1:
            raise ctx.problem("prefix_differs", name, f"differs from the other side before its final Assistant turn "
                                                      f"(they share {n} turns)")
        if not turns[-1].content:
            raise ctx.problem(EMPTY_RESPONSE, name, "has an empty final Assistant turn")
    for i, turn in enumerate(a[:n]):
        if not turn.content:
            raise ctx.problem("empty_prompt", "chosen", f"has an empty turn {i + 1} ({turn.role})")
    return a[:n], a[-1], b[-1]
