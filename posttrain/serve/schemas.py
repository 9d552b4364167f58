"""Request bodies of the OpenAI-compatible API, validated with pydantic; unknown fields are ignored
(clients send many optional ones), wrong values are OpenAI-style 400 errors (`ApiError`) naming the field.
`read_json` is the one way every route (the UI's too) reads a body: strict JSON, valid Unicode."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from posttrain.records import Message

MAX_STOP = 4  # OpenAI's own limit on stop sequences
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes; beyond it, it overflows


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


async def read_json(request: Request) -> dict:
    """The body as a JSON object of strict JSON (no NaN or Infinity) whose strings are all valid Unicode.

    The guard has capped the body's size already. JSON may spell a lone surrogate (\\ud800), which no
    UTF-8 text can hold: refused here, naming where, before it reaches a tokenizer or a reply.
    """
    body = await request.body()
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"We could not parse the JSON body of your request: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        where = _lone_surrogate(data)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if where is not None:
        param = ".".join(str(p) for p in where) or None
        raise ApiError(400, f"Invalid value for '{param}': text holds a lone surrogate (like \\ud800), which is "
                       "not valid Unicode", param=param)
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _lone_surrogate(value, where: tuple = ()) -> tuple | None:
    """Where the first string (or key) that cannot be encoded as UTF-8 sits, or None."""
    if isinstance(value, str):
        return None if value.isascii() or _encodable(value) else where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and not _encodable(key):
            return where
        found = _lone_surrogate(item, (*where, key))
        if found is not None:
            return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
