"""K candidate responses per prompt from one or more models: `posttrain data candidates`, and the rules the UI's
Annotate tab generates by too (serve/ui/candidates.py imports them), so both write the same rows.

Model i of M writes every M-th of the K candidates; each prompt's candidates are then shuffled (seeded by
the prompt id) so a position never gives a model away. With a seed, prompt i samples with seed + i, the
way the UI's engines do, so the command line and the UI give the same candidates for the same settings.
Rows: {"id", "prompt", "responses", "models"} (who wrote each response): the input of the Annotate tab
and of `posttrain data label`. Prompts too long for a model's context are dropped and counted.
"""

from __future__ import annotations

import gc
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from posttrain.curate.stream import AtomicJsonl
from posttrain.data.prompts import read_prompts
from posttrain.errors import ConfigError, DataError
from posttrain.models.generate import generate_from_ids
from posttrain.models.onednn_linear import onednn_linears
from posttrain.models.run import load_model_for_inference
from posttrain.models.sources import model_names
from posttrain.records import Message
from posttrain.templates.render import encode_prompt

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


def blind_row(pid: str, text: str, outputs: dict[str, list[str]], k: int) -> dict:
    """The row of one prompt: model i's outputs at positions i, i + M, ..., then shuffled by the prompt id."""
    names = list(outputs)
    order = [names[j % len(names)] for j in range(k)]
    random.Random(f"candidates:{pid}").shuffle(order)  # blind: no model owns a position
    left = {name: list(texts) for name, texts in outputs.items()}
    return {"id": pid, "prompt": text, "responses": [left[name].pop(0) for name in order], "models": order}


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


def _generate(ref: str, prompts: list[tuple[str, str]], n: int, s: GenSettings, device) -> dict[str, list[str]]:
    """prompt id -> this model's n samples; prompts too long for its context are left out."""
    model, tokenizer, run = load_model_for_inference(ref, device=device)
    system = run.template.system if run is not None else None  # render as the run trained, like the UI's engines
    context = getattr(model.config, "max_position_embeddings", None)
    out = {}
    with onednn_linears(model):  # fixed weights: their oneDNN copies made once, not per prompt
        for index, (pid, text) in enumerate(prompts):
            ids = encode_prompt([Message("user", text)], tokenizer, system=system)
            if context and len(ids) + s.max_tokens > context:
                continue
            seed = None if s.seed is None else s.seed + index
            gens = generate_from_ids(model, tokenizer, [ids] * n, max_new_tokens=s.max_tokens,
                                     temperature=s.temperature, top_p=s.top_p, seed=seed)
            out[pid] = [g.text for g in gens]
    del model
    gc.collect()  # one model in memory at a time
    return out


def generate_candidates(prompts_path: str | Path, refs: list[str], out: str | Path, settings: GenSettings,
                        device: str | None = None) -> dict:
    """Write one row per prompt with K candidates from `refs` (one model loaded at a time)."""
    if not refs:
        raise ConfigError("give at least one model (--models)")
    settings.check(len(refs))
    prompts = read_single_turn(Path(prompts_path))
    names = model_names(refs)
    outputs = {name: _generate(ref, prompts, n, settings, device)
               for name, ref, n in zip(names, refs, share(len(refs), settings.k))}
    too_long = 0
    with AtomicJsonl(out) as writer:
        for pid, text in prompts:
            if not all(pid in outputs[name] for name in names):
                too_long += 1
                continue
            writer.write(blind_row(pid, text, {name: outputs[name][pid] for name in names}, settings.k))
    return {"prompts": len(prompts), "written": writer.count, "dropped": {"too_long": too_long} if too_long else {},
            "models": dict(zip(names, refs)), "settings": asdict(settings), "out": str(out)}
