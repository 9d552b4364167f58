"""The one internal record every data format becomes: a conversation of role/content messages."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    role: str  # one of ROLES
    content: str
    loss_weight: float | None = None  # None: decided by the masking mode; 0 masks the turn; floats weight it
    tool_calls: list[dict] | None = None  # OpenAI-style [{"type": "function", "function": {...}}]

    def to_template_dict(self) -> dict:
        """The dict a Jinja chat template expects (no posttrain-only fields)."""
        out: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)
    tools: list[dict] | None = None  # function schemas passed to the chat template
    text: str | None = None  # plain text for continued pre-training (then messages is empty)
    source: str = ""  # "file:line" or "file row N", for error messages and drop reports
