"""`posttrain data synth`: Self-Instruct (Wang et al., 2023) against an OpenAI-compatible teacher.

Each round samples 8 in-context instructions (6 seeds + 2 machine-made, when there are any),
asks the teacher for more, keeps a new instruction only if it passes the paper's heuristic
filters and its ROUGE-L to every instruction kept so far is below 0.7, then asks whether it
is a classification task and generates an instance (output-first for classification, as in
the paper). Prompts come in English and Chinese (`synth_prompts`): `lang` auto gives each
request the language of its in-context seeds (mixed seed files are split by language) and each
instance request the language of its instruction. Kept rows are appended to
`<out>.partial.jsonl` as they come, so an interrupted run resumes where it stopped; the
finished file is renamed onto `out`. Every proposed instruction ends up kept or counted under
one drop reason: heuristic, similar, no_instance, or surplus (novel, but `n` rows were
already kept).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from posttrain.curate.lang import LANGS, lang_of
from posttrain.curate.stream import iter_rows, side_path
from posttrain.curate.synth_prompts import (PROMPTS, heuristic_reject, is_yes, parse_input_output,  # noqa: F401
                                            parse_label_input, parse_proposals, propose_prompt)
from posttrain.eval import metrics
from posttrain.errors import DataError, PosttrainError, http_error_text

ROUGE_LIMIT = 0.7  # the paper's novelty threshold


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 between two instructions (the novelty test of Self-Instruct): rouge-score, CJK by character."""
    return metrics.rouge_l(a, b)


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


def make_instance(teacher, instruction: str, lang: str = "auto") -> dict | None:
    """Ask whether the task is classification, then generate one instance (output-first if so)."""
    prompts = PROMPTS[lang_of(instruction) if lang == "auto" else lang]
    answer = teacher.complete(prompts["is_classification"].format(instruction=instruction), max_tokens=5,
                              temperature=0.0)
    if is_yes(answer):
        pair = parse_label_input(teacher.complete(prompts["output_first"].format(instruction=instruction)))
        return {"input": pair[1], "output": pair[0], "is_classification": True} if pair else None
    pair = parse_input_output(teacher.complete(prompts["input_first"].format(instruction=instruction)))
    return {"input": pair[0], "output": pair[1], "is_classification": False} if pair else None


def _prompts(rng: random.Random, seeds: dict[str, list[str]], made: list[dict], lang: str, count: int):
    """`count` (language, prompt) pairs: 6 seeds + 2 machine-made examples each, as in the paper.

    With lang auto, a prompt's language is drawn in proportion to the seeds in each language and its
    examples come from that language only, so the teacher sees one language per request.
    """
    out = []
    for _ in range(count):
        if lang == "auto":
            langs = sorted(seeds)
            use = rng.choices(langs, weights=[len(seeds[g]) for g in langs])[0]
            pool = seeds[use]
            machine = [r["instruction"] for r in made if lang_of(r["instruction"]) == use]
        else:
            use, pool = lang, [t for group in seeds.values() for t in group]
            machine = [r["instruction"] for r in made]
        examples = rng.sample(pool, min(6, len(pool))) + rng.sample(machine, min(2, len(machine)))
        out.append((use, propose_prompt(examples, use)))
    return out


def synth(seeds: str | Path, out: str | Path, teacher, n: int, *, seed: int = 0, concurrency: int = 4,
          max_rounds: int | None = None, lang: str = "auto", log=print) -> dict:
    """Generate `n` new instruction rows; resumes from `<out>.partial.jsonl` when it exists.

    lang: auto (prompts in each seed's language), en or zh (every prompt in that language)."""
    if lang not in LANGS:
        raise DataError(f"--lang must be one of {', '.join(LANGS)}, got {lang!r}")
    out = Path(out)
    partial = side_path(out, "partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    seed_tasks = load_seeds(seeds)
    by_lang: dict[str, list[str]] = {}
    for task in seed_tasks:
        by_lang.setdefault(lang_of(task), []).append(task)
    made = [json.loads(line) for line in partial.open()] if partial.exists() else []
    pool = seed_tasks + [r["instruction"] for r in made]
    rng = random.Random(seed + len(made))  # resumed runs draw fresh examples, still deterministically
    stats = {"proposed": 0, "kept": 0, "similar": 0, "heuristic": 0, "no_instance": 0, "surplus": 0,
             "resumed": len(made)}
    prompt_langs, reasons = Counter(), Counter()
    rounds = 0
    with ThreadPoolExecutor(concurrency) as workers, partial.open("a", encoding="utf-8") as sink:
        while len(made) < n:
            rounds += 1
            if max_rounds is not None and rounds > max_rounds:
                raise SynthIncomplete(f"synth: only {len(made)}/{n} rows after {max_rounds} rounds ({stats}, "
                                      f"heuristic reasons {dict(reasons)}); "
                                      f"progress is kept in {partial}, rerun to continue",
                                      {"rows": len(made), "rounds": max_rounds, **stats,
                                       "heuristic_reasons": dict(reasons), "prompts": dict(prompt_langs),
                                       "out": str(partial)})
            prompts = _prompts(rng, by_lang, made, lang, concurrency)
            prompt_langs.update(use for use, _ in prompts)
            accepted = []
            for reply in workers.map(teacher.complete, [p for _, p in prompts]):
                for instruction in parse_proposals(reply):
                    stats["proposed"] += 1
                    if reason := heuristic_reject(instruction):
                        stats["heuristic"] += 1
                        reasons[reason] += 1
                    elif any(rouge_l(instruction, other) >= ROUGE_LIMIT for other in pool):
                        stats["similar"] += 1
                    else:
                        pool.append(instruction)
                        accepted.append(instruction)
            instances = workers.map(lambda i: make_instance(teacher, i, lang), accepted)
            for instruction, inst in zip(accepted, instances):
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
    return {"rows": len(made), "rounds": rounds, **stats, "heuristic_reasons": dict(reasons),
            "prompts": dict(prompt_langs), "out": str(out)}
