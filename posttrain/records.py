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


@dataclass
class RankedResponses:
    """One prompt and K >= 2 responses with ranks (0 = best; equal ranks are ties).

    A preference pair is the K = 2 case with ranks [0, 1]; `margin` applies to pairs only.
    """

    prompt: list[Message]  # the conversation up to the response (ends with a user turn)
    responses: list[Message]  # K assistant messages
    ranks: list[int]  # one per response, lower is better
    margin: float = 0.0  # required reward gap for a pair (Llama 2 style), 0 = none
    source: str = ""

    def pairs(self) -> list[tuple[int, int]]:
        """Every ordered (better, worse) index pair; ties give none (InstructGPT's C(K,2))."""
        k = len(self.responses)
        return [(i, j) for i in range(k) for j in range(k) if self.ranks[i] < self.ranks[j]]


def PreferencePair(prompt: list[Message], chosen: Message, rejected: Message, margin: float = 0.0,
                   source: str = "") -> RankedResponses:
    """A chosen/rejected pair, as the K = 2 ranked record every preference stage consumes."""
    return RankedResponses(prompt, [chosen, rejected], [0, 1], margin, source)
