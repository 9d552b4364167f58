"""What a request asks the serving engine for (`Job`, `Sampling`), and the stop-string filter of streamed text."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from posttrain.records import Message


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def batch_key(self) -> tuple:
        return (self.max_new_tokens, self.temperature, self.top_p, self.stop)


@dataclass
class Job:
    prompt_ids: list[int]
    n: int
    sampling: Sampling
    strip: bool = True  # chat replies are stripped like `posttrain chat`; raw completions are not
    on_text: Callable[[int, str], None] | None = None  # set: stream (choice index, piece), on the worker thread
    score: tuple[list[Message], list[str]] | None = None  # set: a scoring job, not generation
    future: Future = field(default_factory=Future)
    cancelled: bool = False  # the client went away: skip the job, or stop generating for it
    images: list = field(default_factory=list)  # PIL images for the prompt's <image> runs, in order (vision models)


class _Halt(Exception):
    """Raised inside a streamer to end a streamed generation early (stop string or cancelled job)."""


class StopFilter:
    """Forwards streamed text but holds back anything that may be the start of a stop string."""

    def __init__(self, stop: tuple[str, ...], emit: Callable[[str], None]):
        self.stop, self.emit, self.buffer, self.hit = [s for s in stop if s], emit, "", False

    def feed(self, piece: str) -> None:
        self.buffer += piece
        cuts = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.hit = True
            self._send(self.buffer[: min(cuts)])
            raise _Halt
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        ready, held = self.buffer[: len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        self._send(ready)
        self.buffer = held

    def flush(self) -> None:
        self._send(self.buffer)

    def _send(self, text: str) -> None:
        self.buffer = ""
        if text:
            self.emit(text)
