"""Request bodies of the OpenAI-compatible API, validated with pydantic; unknown fields are ignored
(clients send many optional ones), wrong values are OpenAI-style 400 errors naming the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from posttrain.data.records import Message

MAX_STOP = 4  # OpenAI's own limit on stop sequences
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes; beyond it, it overflows


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """Plain text; list content keeps only its text parts (this server has no image input)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""

    def to_message(self) -> Message:
        return Message(role="system" if self.role == "developer" else self.role, content=self.text())


class Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampled):
    prompt: str | list[str]
    echo: bool = False


class ScoreRequest(BaseModel):
    """Reward scoring: one prompt (or a conversation) and the responses to score."""

    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    responses: list[str] = Field(min_length=1)
