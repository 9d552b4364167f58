"""Opt-in request logs for `posttrain serve --log-dir` and `posttrain ui --log-dir`: the data of the feedback loop.

Off unless asked for. Each answered chat or completion request appends one JSON line to
`<dir>/chat.jsonl`: {"time" (UTC, ISO 8601), "model", "user" (the API's `user` field; the UI sends its
annotator name; null when none), "endpoint" ("chat" or "completions"), "messages" (chat) or "prompt"
(completions), "responses" (one text per choice), "finish_reasons"}. Nothing else is stored: no IP
address, no header, no key. When the file would pass `max_bytes` it is renamed `chat-000001.jsonl`,
`chat-000002.jsonl`, ... (oldest first) and a new one starts; no file is ever deleted.
`posttrain data from-logs DIR` turns the files into prompt or SFT rows.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

CURRENT = "chat.jsonl"


def rotated_name(n: int) -> str:
    return f"chat-{n:06d}.jsonl"


class ChatLog:
    """Appends one JSON line per answered request; thread-safe; rotates by size."""

    def __init__(self, folder: str | Path, max_bytes: int = 50 << 20):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / CURRENT
        self.lock = threading.Lock()

    def announcement(self, what: str, user: str = "the request's 'user' field") -> str:
        """The start-up line: logging is never silent."""
        return (f"{what} logs every request to {self.path} (prompts, replies, model, time and {user}; files rotate "
                f"at {self.max_bytes / 2**20:g} MiB); see README 'Feedback loops'")

    def write(self, record: dict) -> None:
        line = (json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record},
                           ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            size = self.path.stat().st_size if self.path.is_file() else 0
            if size and size + len(line) > self.max_bytes:
                self._rotate()
            with self.path.open("ab") as f:
                f.write(line)

    def _rotate(self) -> None:
        taken = [int(p.stem.split("-")[1]) for p in self.folder.glob("chat-[0-9]*.jsonl") if p.stem[5:].isdigit()]
        self.path.rename(self.folder / rotated_name(max(taken, default=0) + 1))


def request_logger(chat_log: ChatLog | None, model: str, user: str | None, **request) -> Callable | None:
    """A function the handler calls with the request's generations once they are done; None when not logging.
    `request`: endpoint and messages (chat) or prompt (completions)."""
    if chat_log is None:
        return None

    def write(gens) -> None:
        chat_log.write({"model": model, "user": user, **request, "responses": [g.text for g in gens],
                        "finish_reasons": [g.finish_reason for g in gens]})
    return write
