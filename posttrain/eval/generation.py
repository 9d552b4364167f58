"""Generate answers for a prompt file (batched, cached, resumable) and score them against references.

Prompt files are read by data/prompts.py (any SFT layout, or {"prompt", "reference"?} rows).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from posttrain.data.prompts import PromptItem, read_prompts
from posttrain.errors import DataError
from posttrain.eval.progress import Progress
from posttrain.models.run import model_stamp, load_model_for_inference, run_config_of
from posttrain.models.generate import generate_batch
from posttrain.models.onednn_linear import onednn_linears
from posttrain.eval.metrics import reference_scores


def _prompt_hash(item: PromptItem, system: str | None) -> str:
    data = [system, [(m.role, m.content) for m in item.messages]]
    return hashlib.sha256(json.dumps(data, ensure_ascii=False).encode()).hexdigest()[:16]


def load_cached(path: Path, settings: dict, items: list[PromptItem], system: str | None) -> dict[str, dict]:
    """id -> cached row of `path`; a row made with other settings, or for a prompt that has changed
    under the same id, is an error rather than a silent mix of old and new answers."""
    if not path.is_file():
        return {}
    hashes = {it.id: _prompt_hash(it, system) for it in items}
    done = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        old = row.get("settings", {})
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise DataError(f"{path} line {n}: cached answers were made with other {', '.join(diff)} "
                            f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); delete the file or write elsewhere")
        if row["id"] in hashes and row.get("prompt_hash") != hashes[row["id"]]:
            raise DataError(f"{path} line {n}: prompt id {row['id']!r} has changed since it was answered; "
                            "delete the file or write elsewhere")
        done[row["id"]] = row
    return done


def generate_file(load_model: Callable[[], tuple], items: list[PromptItem], out_path: str | Path, *,
                  model_ref: str, batch_size: int = 8, system: str | None = None, max_new_tokens: int = 256,
                  temperature: float = 0.0, seed: int | None = None) -> list[dict]:
    """One {"id", "prompt", "prediction", "reference", ...} row per item, appended to out_path as it goes.

    Rows already in out_path are reused, so an interrupted run resumes, and `load_model()` ->
    (model, tokenizer) is only called when something is left to generate. Prompts go in
    length-sorted batches (less padding); results come back in file order.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"model": model_ref, "weights": hashlib.sha256(model_stamp(model_ref).encode()).hexdigest()[:12],
                "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    done = load_cached(out_path, settings, items, system)
    todo = [it for it in items if it.id not in done]
    todo.sort(key=lambda it: sum(len(m.content) for m in it.messages))
    model, tokenizer = load_model() if todo else (None, None)
    with out_path.open("a", encoding="utf-8") as f, \
            Progress(len(items), f"generate {out_path.stem}", "answer", done=len(items) - len(todo)) as progress, \
            onednn_linears(model, head="greedy" if temperature <= 0 else "float32") \
            if model is not None else contextlib.nullcontext():  # fixed weights: packed once
        for k in range(0, len(todo), batch_size):
            chunk = todo[k:k + batch_size]
            replies = generate_batch(model, tokenizer, [it.messages for it in chunk], system=system,
                                     max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            for it, reply in zip(chunk, replies):
                row = {"id": it.id, "prompt": it.messages[-1].content, "prediction": reply,
                       "reference": it.reference, "prompt_hash": _prompt_hash(it, system), "settings": settings}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[it.id] = row
            f.flush()
            progress.update(len(chunk))
    return [done[it.id] for it in items]


def run(model_ref: str, data: str, out: str, *, batch_size: int = 8, max_new_tokens: int = 256,
        temperature: float = 0.0, segment: str = "auto", device: str | None = None, strict: bool = False) -> dict:
    """Generate predictions for `data` into `out` (JSONL) and write BLEU/ROUGE beside it (.scores.json) when the
    data has reference answers."""
    cfg = run_config_of(model_ref)
    items = read_prompts(data, strict=strict)
    rows = generate_file(lambda: load_model_for_inference(model_ref, device=device)[:2], items, out,
                         model_ref=model_ref, batch_size=batch_size, system=cfg.template.system if cfg else None,
                         max_new_tokens=max_new_tokens, temperature=temperature)
    scored = [r for r in rows if r["reference"] is not None]
    if not scored:  # prompts alone: the predictions are the result
        return {"model": model_ref, "data": data, "out": str(out), "predictions": len(rows), "scored": 0}
    scores = reference_scores([r["prediction"] for r in scored], [r["reference"] for r in scored], segment)
    scores_path = Path(out).with_suffix(".scores.json")
    scores_path.write_text(json.dumps({"model": model_ref, "data": data, **scores}, indent=2), encoding="utf-8")
    return scores
