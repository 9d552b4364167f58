"""Where a row came from (file, line, column renames), so every check on it can name file, line and field.

Structural problems are DataErrors; content problems (a blank text) are ContentProblems, dropped and
counted unless data.strict (data/policy.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from posttrain.data.images import content_text
from posttrain.data.policy import ContentProblem
from posttrain.errors import DataError


class RowContext:
    """Where a row came from, so every check can name file, line and field (with its file column).

    `images` collects the URLs of OpenAI image_url parts in order (None: the model takes no images)."""

    def __init__(self, source: str, columns: Mapping[str, str], images: bool = False):
        self.source = source
        self.columns = columns
        self.images: list[str] | None = [] if images else None

    def fail(self, field: str, problem: str) -> DataError:
        top = re.split(r"[\[.]", field, maxsplit=1)[0]
        renamed = f" (column '{self.columns[top]}')" if self.columns.get(top, top) != top else ""
        return DataError(f"{self.source}: field '{field}'{renamed} {problem}")

    def problem(self, reason: str, field: str, problem: str) -> ContentProblem:
        """A content problem of this row (data/policy.py): dropped and counted unless data.strict."""
        return ContentProblem(reason, str(self.fail(field, problem)))

    def text(self, value, field: str, *, allow_empty: bool = False, empty: str = "empty_prompt") -> str:
        """A string field; a list of OpenAI content parts is joined (images become placeholders), anything
        else is an error.

        Missing (None) or not a string: structural, a DataError. Blank: a content problem `empty`."""
        if isinstance(value, list) and all(isinstance(p, dict) and "type" in p for p in value):
            value = content_text(value, self, field, self.images)
        if value is None:
            raise self.fail(field, "is missing/empty")
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, got {type(value).__name__}: {short(value)}")
        if not value.strip() and not allow_empty:
            raise self.problem(empty, field, "is empty")
        return value

    def optional_text(self, value, field: str) -> str | None:
        blank = value is None or (isinstance(value, str) and not value.strip())
        return None if blank else self.text(value, field)

    def items(self, value, field: str) -> list:
        if value is None or (isinstance(value, list) and not value):
            raise self.fail(field, "is missing/empty")
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list, got {type(value).__name__}: {short(value)}")
        return value


EMPTY_RESPONSE = "empty_response"  # drop reason of a blank assistant reply; any other blank text is empty_prompt


def empty_reason(role: str) -> str:
    return EMPTY_RESPONSE if role == "assistant" else "empty_prompt"


def short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
