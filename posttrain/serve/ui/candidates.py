"""Candidate generation for the Annotate tab: K responses per prompt from 1+ models, inside the server.

Each chosen model answers through its `Engine`, the one the chat tab and the API use (same prompt
rendering by `encode_prompt`, same batching). Who writes which candidate, and the blind shuffle, are
curate/candidates.py's (the same rules as `posttrain data candidates`). Each finished prompt is appended at once to
`<workdir>/candidates/<prompts>-<hash>.jsonl` in the annotation input layout plus `models` (who
wrote each response); the hash covers the prompts file and the settings, so starting the same
generation again resumes it and a refresh or a crash loses at most the prompts in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict
from pathlib import Path

from posttrain.curate.candidates import GenSettings, blind_row, read_single_turn, share
from posttrain.errors import ConfigError
from posttrain.records import Message
from posttrain.serve.engine import Engine, Job, Sampling
from posttrain.templates.render import encode_prompt

log = logging.getLogger(__name__)
def output_path(prompts: Path, models: list[str], settings: GenSettings, workdir: Path) -> Path:
    key = json.dumps([str(prompts.resolve()), models, asdict(settings)])
    return workdir / "candidates" / f"{prompts.stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.jsonl"


class CandidateJob:
    """One generation run on a background thread; `status()` is safe to call from any thread."""

    def __init__(self, prompts_path: str | Path, engines: dict[str, Engine], settings: GenSettings, workdir: Path):
        if not str(prompts_path).strip():
            raise ConfigError("give a prompts file to generate candidates for")
        if not engines:
            raise ConfigError("choose at least one model to generate candidates")
        settings.check(len(engines))
        self.prompts_path, self.engines, self.settings = Path(prompts_path), engines, settings
        self.prompts = read_single_turn(self.prompts_path)
        self.out = output_path(self.prompts_path, list(engines), settings, workdir)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        done = {row["id"] for row in _saved_rows(self.out)}
        self.todo = [(i, pid, text) for i, (pid, text) in enumerate(self.prompts) if pid not in done]
        self.resumed, self.done = len(self.prompts) - len(self.todo), 0
        self.dropped: dict[str, int] = {}
        self.error: str | None = None
        self.cancelled = False
        self.out.with_suffix(".settings.json").write_text(json.dumps(
            {"prompts": str(self.prompts_path), "models": list(engines), **asdict(settings)}, indent=1))
        self.thread = threading.Thread(target=self._run, name="candidates", daemon=True)
        self.thread.start()

    def status(self) -> dict:
        return {"running": self.thread.is_alive(), "out": str(self.out), "total": len(self.prompts),
                "done": self.resumed + self.done, "resumed": self.resumed, "dropped": dict(self.dropped),
                "error": self.error, "cancelled": self.cancelled, "models": list(self.engines),
                "prompts": str(self.prompts_path), "settings": asdict(self.settings)}

    def stop(self) -> None:
        self.cancelled = True  # the prompts already submitted finish and are saved; no new ones start

    def _run(self) -> None:
        counts = share(len(self.engines), self.settings.k)
        window = max(1, min(e.max_batch for e in self.engines.values()) // max(counts))  # one batch per engine
        try:
            with self.out.open("a", encoding="utf-8") as sink:
                for start in range(0, len(self.todo), window):
                    if self.cancelled:
                        break
                    chunk = self.todo[start:start + window]
                    pending = [(item, self._submit(item, counts)) for item in chunk]
                    for (_, pid, text), futures in pending:
                        row = self._collect(pid, text, futures)
                        if row is not None:
                            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                            sink.flush()
                        self.done += 1
        except Exception as err:  # noqa: BLE001 - shown in the UI; what was saved stays saved
            log.exception("candidate generation failed")
            self.error = f"{type(err).__name__}: {err}"

    def _submit(self, item: tuple[int, str, str], counts: list[int]) -> dict | None:
        """Queue one prompt on every chosen engine; None when it does not fit a model's context."""
        index, _, text = item
        s = self.settings
        prompts = {name: encode_prompt([Message("user", text)], e.tokenizer, system=e.system)
                   for name, e in self.engines.items()}
        for name, engine in self.engines.items():
            if engine.context_length and len(prompts[name]) + s.max_tokens > engine.context_length:
                return None
        seed = None if s.seed is None else s.seed + index
        sampling = Sampling(max_new_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=seed)
        return {name: engine.submit(Job(prompts[name], n, sampling))
                for (name, engine), n in zip(self.engines.items(), counts)}

    def _collect(self, pid: str, text: str, futures: dict | None) -> dict | None:
        if futures is None:
            self.dropped["too_long"] = self.dropped.get("too_long", 0) + 1
            return None
        return blind_row(pid, text, {name: [g.text for g in future.result()] for name, future in futures.items()},
                         self.settings.k)


def _saved_rows(path: Path) -> list[dict]:
    """The rows already in `path`, after cutting off a last line that a crash left half-written."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)  # that prompt is generated again
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
