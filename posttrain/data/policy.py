"""The one data policy every reader follows (SFT, preference, prompts): structure is fatal, content is counted.

A structural problem (a file that is not valid JSON, a field of the wrong type, an unknown role, a
missing column) means the file is not what the reader takes it for: a DataError naming file, line
and field. A content problem in one row of otherwise valid data (an empty response, chosen equal to
rejected, a sample too long for data.max_length) drops that row and counts it by reason; with
`data.strict: true` (`--strict` on the commands) it is a DataError instead.
"""

from __future__ import annotations

from collections import Counter

from posttrain.errors import DataError

STRICT_HINT = "data.strict / --strict is on; turn it off to drop and count such rows instead"


class ContentProblem(DataError):
    """One row's content cannot be trained on (`reason`: 'empty_response', 'prefix_differs', ...).

    A DataError, so a reader that does not apply the policy still stops with file, line and field."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{message} [{reason}]")
        self.reason = reason


def drop_or_raise(drops: Counter, reason: str, where: str, strict: bool, detail: str = "") -> None:
    """Count one dropped row under `reason`; with `strict`, raise a DataError naming `where` instead."""
    if strict:
        raise DataError(f"{where}: {detail or reason.replace('_', ' ')} [{reason}]; {STRICT_HINT}")
    drops[reason] += 1


def count_problem(drops: Counter, problem: ContentProblem, strict: bool) -> None:
    """Count a ContentProblem by its reason, or re-raise it under strict (its message names file and field)."""
    if strict:
        raise DataError(f"{problem}; {STRICT_HINT}") from None
    drops[problem.reason] += 1


def drop_sample(drops: Counter, drop, source: str, strict: bool) -> None:
    """The same for a templates.render.DropSample (too_long, no_final_reply, chosen_equals_rejected, ...)."""
    extra = (drop.detail or "").removeprefix(source).strip()  # DropSample details start with the row's source
    drop_or_raise(drops, drop.reason, source, strict, drop.reason.replace("_", " ") + (f" ({extra})" if extra else ""))


def drop_summary(drops: Counter | dict) -> str:
    """'empty_response=2, too_long=1' for a log line, in a stable order."""
    return ", ".join(f"{k}={v}" for k, v in sorted(drops.items()))
