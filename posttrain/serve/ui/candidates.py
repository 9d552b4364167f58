"""Candidate generation for the Annotate tab: K responses per prompt from 1+ models, inside the server.

Each chosen model answers through its `Engine`, the one the chat tab and the API use (same prompt
rendering by `encode_prompt`, same batching). Model i of M writes every M-th of the K candidates, and
each prompt's candidates are then shuffled (seeded by the prompt id, so reruns agree) so that a
position never gives away a model to the annotator. Each finished prompt is appended at once to
`<workdir>/candidates/<prompts>-<hash>.jsonl` in the annotation input layout plus `models` (who
wrote each response); the hash covers the prompts file and the settings, so starting the same
generation again resumes it and a refresh or a crash loses at most the prompts in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from posttrain.records import Message
from posttrain.data.prompts import read_prompts
from posttrain.errors import ConfigError, DataError
from posttrain.serve.engine import Engine, Job, Sampling
from posttrain.templates.render import encode_prompt

log = logging.getLogger(__name__)
MAX_K = 8  # candidates per prompt; more than a person can rank with care


@dataclass(frozen=True)
class GenSettings:
    k: int = 3  # candidates per prompt, spread evenly over the chosen models
    temperature: float = 0.8  # > 0, or every sample of one model is the same text
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int | None = None  # set: prompt i samples with seed + i, so a rerun repeats the candidates

    def check(self, n_models: int) -> None:
        if not 2 <= self.k <= MAX_K:
            raise ConfigError(f"K must be 2..{MAX_K} candidates per prompt (got {self.k})")
        if self.k < n_models:
            raise ConfigError(f"K={self.k} candidates cannot include all {n_models} chosen models")
        if self.temperature <= 0 and self.k > n_models:
            raise ConfigError(f"temperature 0 is greedy: with {n_models} model(s) and K={self.k} a model would write "
                              "the same answer twice; raise the temperature or choose K models")
        if self.max_tokens < 1 or not 0 < self.top_p <= 1 or not 0 <= self.temperature <= 2:
            raise ConfigError("max tokens must be >= 1, top_p in (0, 1] and temperature in [0, 2]")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ConfigError("seed must be between 0 and 2**32 - 1")


def share(n_models: int, k: int) -> list[int]:
    """How many of the k candidates each model writes (model i writes candidates i, i + M, ...)."""
    return [len(range(i, k, n_models)) for i in range(n_models)]


def output_path(prompts: Path, models: list[str], settings: GenSettings, workdir: Path) -> Path:
    key = json.dumps([str(prompts.resolve()), models, asdict(settings)])
    return workdir / "candidates" / f"{prompts.stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.jsonl"


def read_single_turn(path: Path) -> list[tuple[str, str]]:
    """(id, user text) per prompt, from {"prompt": ...} rows or any SFT layout (a trailing answer is ignored)."""
    out = []
    for i, item in enumerate(read_prompts(path)):
        if len(item.messages) != 1:
            raise DataError(f"{path} prompt {i + 1} (id {item.id}): candidates are generated for one user turn; "
                            f"this prompt has {len(item.messages)} messages")
        out.append((item.id, item.messages[0].content))
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


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
        outputs = {name: [g.text for g in future.result()] for name, future in futures.items()}
        names = list(self.engines)
        order = [names[j % len(names)] for j in range(self.settings.k)]
        random.Random(f"candidates:{pid}").shuffle(order)  # blind: no model owns a position
        responses = [outputs[name].pop(0) for name in order]
        return {"id": pid, "prompt": text, "responses": responses, "models": order}


def _saved_rows(path: Path) -> list[dict]:
    """The rows already in `path`, after cutting off a last line that a crash left half-written."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)  # that prompt is generated again
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
