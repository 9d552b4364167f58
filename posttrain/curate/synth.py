"""`posttrain data synth`: Self-Instruct (Wang et al., 2023) against an OpenAI-compatible teacher.

Each round samples 8 in-context instructions (6 seeds + 2 machine-made, when there are any),
asks the teacher for more, keeps a new instruction only if it passes the paper's heuristic
filters and its ROUGE-L to every instruction kept so far is below 0.7, then asks whether it
is a classification task and generates an instance (output-first for classification, as in
the paper). Kept rows are appended to `<out>.partial.jsonl` as they come, so an interrupted
run resumes where it stopped; the finished file is renamed onto `out`. Every proposed
instruction ends up kept or counted under one drop reason: heuristic, similar, no_instance, or
surplus (novel, but `n` rows were already kept).
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from posttrain.curate.stream import iter_rows, side_path
from posttrain.eval import metrics
from posttrain.errors import DataError, PosttrainError, http_error_text

ROUGE_LIMIT = 0.7  # the paper's novelty threshold
BLOCKED = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
           "plot", "go to", "video", "audio", "music", "flowchart", "diagram")  # tasks a text model cannot do


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(a: str | list[str], b: str | list[str]) -> float:
    """ROUGE-L F1 between two texts (the novelty test of Self-Instruct); the metric lives in eval.metrics."""
    x = _tokens(a) if isinstance(a, str) else a
    y = _tokens(b) if isinstance(b, str) else b
    return metrics.rouge_l(x, y)


def heuristic_reject(instruction: str) -> str | None:
    """The paper's filters: length, tasks needing images/files, programs, odd first characters."""
    words = instruction.split()
    if len(words) <= 3 or len(words) > 150:
        return "length"
    lowered = instruction.lower()
    if any(re.search(rf"\b{re.escape(b)}\b", lowered) for b in BLOCKED):
        return "blocked keyword"
    if lowered.startswith("write a program"):
        return "program"
    if not instruction[0].isascii() or not instruction[0].isalnum():
        return "first character"
    return None


class SynthIncomplete(PosttrainError):
    """`max_rounds` ran out before `n` rows were kept; `report` has the same counts as a finished run."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class OpenAITeacher:
    """POST /chat/completions with retries (exponential backoff) and a requests-per-second limit.

    `max_tokens` (optional) caps every request's reply length, e.g. to bound a paid API's cost.
    """

    def __init__(self, base_url: str, model: str = "teacher", api_key: str | None = None, retries: int = 4,
                 rps: float | None = None, timeout: float = 120.0, backoff: float = 1.0,
                 max_tokens: int | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.retries, self.timeout, self.backoff = model, retries, timeout, backoff
        self.max_tokens = max_tokens
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY", "")
        self.interval = 1.0 / rps if rps else 0.0
        self._lock, self._next = threading.Lock(), 0.0

    def _wait_turn(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(max(0.0, start - now))

    def complete(self, prompt: str, max_tokens: int = 512, temperature: float = 0.7) -> str:
        max_tokens = min(max_tokens, self.max_tokens or max_tokens)
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "temperature": temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            self._wait_turn()
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as err:
                last = http_error_text(err)
                if err.code not in (408, 409, 429) and err.code < 500:
                    raise PosttrainError(f"teacher {self.url} refused the request: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, json.JSONDecodeError) as err:
                last = f"{type(err).__name__}: {err}"
            time.sleep(self.backoff * 2**attempt)
        raise PosttrainError(f"teacher {self.url} failed {self.retries + 1} times; last error: {last}")


class LocalTeacher:
    """A local model through posttrain's own generation (run dir, model folder or built-in)."""

    def __init__(self, model: str, max_tokens: int | None = None):
        from posttrain.models.run import load_model_for_inference

        self.model, self.tokenizer, _ = load_model_for_inference(model)
        self.max_tokens = max_tokens

    def complete(self, prompt: str, max_tokens: int = 512, temperature: float = 0.7) -> str:
        from posttrain.records import Message
        from posttrain.models.generate import generate_reply

        max_tokens = min(max_tokens, self.max_tokens or max_tokens)

        return generate_reply(self.model, self.tokenizer, [Message("user", prompt)], system=None,
                              max_new_tokens=max_tokens, temperature=temperature, top_p=1.0)


def load_seeds(path: str | Path) -> list[str]:
    """Seed instructions from Self-Instruct's seed_tasks.jsonl or any file with an `instruction` column."""
    seeds = []
    for source, row in iter_rows(path):
        if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise DataError(f"{source}: field 'instruction' is missing/empty")
        seeds.append(row["instruction"].strip())
    if not seeds:
        raise DataError(f"{path}: no seed tasks")
    return seeds


def propose_prompt(examples: list[str]) -> str:
    lines = ["Come up with a series of tasks:"] + [f"Task {i}: {e}" for i, e in enumerate(examples, start=1)]
    return "\n".join(lines + [f"Task {len(examples) + 1}:"])


def parse_proposals(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:Task\s*)?\d+\s*[:.)]\s*", "", line).strip()
        if line:
            out.append(line)
    return out


def make_instance(teacher, instruction: str) -> dict | None:
    """Ask whether the task is classification, then generate one instance (output-first if so)."""
    answer = teacher.complete("Can the following task be regarded as a classification task with finite output "
                              f"labels? Answer Yes or No.\n\nTask: {instruction}", max_tokens=5, temperature=0.0)
    is_cls = answer.strip().lower().startswith("yes")
    if is_cls:
        text = teacher.complete("Given the classification task definition, first write a class label, then an "
                                "input of that class. Reply exactly as\nClass label: <label>\nInput: <input>\n\n"
                                f"Task: {instruction}")
        m = re.search(r"Class label:\s*(.+?)\s*\n\s*Input:\s*(.*)", text, re.S)
        return {"input": m.group(2).strip(), "output": m.group(1).strip(), "is_classification": True} if m else None
    text = teacher.complete("Come up with one example for the following task. Reply exactly as\nInput: <the input, "
                            f"or <noinput> when none is needed>\nOutput: <the output>\n\nTask: {instruction}")
    m = re.search(r"Input:\s*(.*?)\s*\n\s*Output:\s*(.+)", text, re.S)
    if not m:
        return None
    inp = "" if m.group(1).strip() in ("", "<noinput>") else m.group(1).strip()
    return {"input": inp, "output": m.group(2).strip(), "is_classification": False}


def synth(seeds: str | Path, out: str | Path, teacher, n: int, *, seed: int = 0, concurrency: int = 4,
          max_rounds: int | None = None, log=print) -> dict:
    """Generate `n` new instruction rows; resumes from `<out>.partial.jsonl` when it exists."""
    out = Path(out)
    partial = side_path(out, "partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    seed_tasks = load_seeds(seeds)
    made = [json.loads(line) for line in partial.open()] if partial.exists() else []
    pool_tokens = [_tokens(t) for t in seed_tasks + [r["instruction"] for r in made]]
    rng = random.Random(seed + len(made))  # resumed runs draw fresh examples, still deterministically
    stats = {"proposed": 0, "kept": 0, "similar": 0, "heuristic": 0, "no_instance": 0, "surplus": 0,
             "resumed": len(made)}
    rounds = 0
    with ThreadPoolExecutor(concurrency) as pool, partial.open("a", encoding="utf-8") as sink:
        while len(made) < n:
            rounds += 1
            if max_rounds is not None and rounds > max_rounds:
                raise SynthIncomplete(f"synth: only {len(made)}/{n} rows after {max_rounds} rounds ({stats}); "
                                      f"progress is kept in {partial}, rerun to continue",
                                      {"rows": len(made), "rounds": max_rounds, **stats, "out": str(partial)})
            prompts = []
            for _ in range(concurrency):
                machine = [r["instruction"] for r in made]
                examples = rng.sample(seed_tasks, min(6, len(seed_tasks)))
                examples += rng.sample(machine, min(2, len(machine)))
                prompts.append(propose_prompt(examples))
            accepted = []
            for reply in pool.map(teacher.complete, prompts):
                for instruction in parse_proposals(reply):
                    stats["proposed"] += 1
                    toks = _tokens(instruction)
                    if heuristic_reject(instruction):
                        stats["heuristic"] += 1
                    elif any(rouge_l(toks, other) >= ROUGE_LIMIT for other in pool_tokens):
                        stats["similar"] += 1
                    else:
                        pool_tokens.append(toks)
                        accepted.append(instruction)
            for instruction, inst in zip(accepted, pool.map(lambda i: make_instance(teacher, i), accepted)):
                if inst is None:
                    stats["no_instance"] += 1
                elif len(made) >= n:
                    stats["surplus"] += 1
                else:
                    made.append({"instruction": instruction, **inst})
                    stats["kept"] += 1
                    sink.write(json.dumps(made[-1], ensure_ascii=False) + "\n")
                    sink.flush()
            log(f"synth: round {rounds}: {len(made)}/{n} kept ({stats})")
    os.replace(partial, out)
    return {"rows": len(made), "rounds": rounds, **stats, "out": str(out)}
