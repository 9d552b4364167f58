"""KTO-style rows (LLaMA-Factory's `kto_en_demo` layout): a conversation (`messages`, `conversations`, ...)
whose final assistant reply is labelled desirable (`label: true`) or undesirable (`label: false`).

No stage trains on them yet; `posttrain data validate` reads them here, under the one data policy
(data/policy.py): a label that is not a bool is structural (fatal), a blank turn or a conversation
with no final reply to label is a content problem (dropped and counted, fatal under strict).
"""

from __future__ import annotations

from collections.abc import Mapping

from posttrain.data.formats import row_to_conversation
from posttrain.data.policy import ContentProblem
from posttrain.errors import DataError
from posttrain.records import Conversation


def is_kto_row(row: Mapping) -> bool:
    """A conversation row with a `label` column (any value: a wrong type is then a field error)."""
    return "label" in row and any(k in row for k in ("messages", "conversations"))


def row_to_kto(row: Mapping, *, source: str, variables: Mapping[str, str] | None = None) -> tuple[Conversation, bool]:
    """(the conversation, whether its final reply is desirable)."""
    label = row.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{source}: field 'label' must be true or false (is the final reply desirable?), "
                        f"got {label!r:.40}")
    conv = row_to_conversation({k: v for k, v in row.items() if k != "label"}, "auto", source=source,
                               variables=variables)
    if not conv.messages or conv.messages[-1].role != "assistant":
        raise ContentProblem("no_final_reply", f"{source}: the conversation does not end with an assistant reply "
                                               "for 'label' to judge")
    return conv, label
