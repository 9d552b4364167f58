"""The vote record: one format for a person's arena vote (the web UI writes it) and a judge's vote
(`eval compare`); `eval ratings` reads both (eval/votes.py)."""

from __future__ import annotations

import hashlib
import time


def prompt_id(prompt: str) -> str:
    """A vote's prompt id when only the text is known (UI votes): the same text, the same id."""
    return "p-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]


def human_vote(model_a: str | None, model_b: str | None, winner: str, annotator: str | None, prompt: str | None = None,
               response_a: str | None = None, response_b: str | None = None) -> dict:
    """The vote record a person's arena vote becomes (same format as a judge's vote); one that names no
    model is kept as given, and `eval ratings` counts it as malformed."""
    name = (annotator or "").strip()
    return {"prompt_id": prompt_id(prompt or ""), "model_a": model_a, "model_b": model_b, "winner": winner,
            "judge": f"human:{name}" if name else "human", "annotator": name or None, "prompt": prompt,
            "response_a": response_a, "response_b": response_b, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
