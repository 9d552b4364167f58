"""Generate answers for a prompt file (batched, cached, resumable) and score them against references.

A prompt file is JSONL/JSON/CSV in any SFT layout (alpaca, sharegpt, openai): the last assistant
turn is the reference and the turns before it are the prompt. Rows of the form
{"prompt": ..., "reference": ...} work too (reference optional: comparisons need none).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.records import Message
from posttrain.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PromptItem:
    id: str
    messages: list[Message]  # the conversation to answer (ends with a user turn)
    reference: str | None


def read_prompts(path: str | Path, variables: dict[str, str] | None = None) -> list[PromptItem]:
    from posttrain.data.formats import row_to_conversation
    from posttrain.data.reading import read_rows, source_of

    items = []
    for i, row in enumerate(read_rows(path)):
        source = source_of(path, i)
        if isinstance(row.get("prompt"), str):
            ref = row.get("reference") or row.get("output") or row.get("answer")
            items.append(PromptItem(str(row.get("id") or i), [Message("user", row["prompt"])], ref))
            continue
        conv = row_to_conversation({k: v for k, v in row.items() if v is not None}, "auto", source=source,
                                   variables=variables)
        messages, ref = list(conv.messages), None
        if messages and messages[-1].role == "assistant":
            ref = messages.pop().content
        if not messages or messages[-1].role != "user":
            raise DataError(f"{source}: a prompt must end with a user turn")
        items.append(PromptItem(str(row.get("id") or i), messages, ref))
    return items


def _load_cached(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {r["id"]: r for r in rows}


def generate_file(model, tokenizer, items: list[PromptItem], out_path: str | Path, *, batch_size: int = 8,
                  system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                  seed: int | None = None) -> list[dict]:
    """One {"id", "prompt", "prediction", "reference"} row per item, appended to out_path as it goes.

    Rows already in out_path are reused, so an interrupted run resumes; prompts go in
    length-sorted batches (less padding), and results come back in file order.
    """
    from posttrain.serve.generate import generate_batch

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _load_cached(out_path)
    todo = sorted((it for it in items if it.id not in done), key=lambda it: sum(len(m.content) for m in it.messages))
    start = time.time()
    with out_path.open("a", encoding="utf-8") as f:
        for k in range(0, len(todo), batch_size):
            chunk = todo[k:k + batch_size]
            replies = generate_batch(model, tokenizer, [it.messages for it in chunk], system=system,
                                     max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            for it, reply in zip(chunk, replies):
                row = {"id": it.id, "prompt": it.messages[-1].content, "prediction": reply,
                       "reference": it.reference}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[it.id] = row
            f.flush()
            log.info("generated %d/%d (%.0f s)", min(k + batch_size, len(todo)), len(todo), time.time() - start)
    return [done[it.id] for it in items]


def run(model_ref: str, data: str, out: str, *, batch_size: int = 8, max_new_tokens: int = 256,
        temperature: float = 0.0, segment: str = "auto", device: str | None = None) -> dict:
    """Generate predictions for `data` into `out` (JSONL) and write BLEU/ROUGE beside it (.scores.json)."""
    from posttrain.eval.metrics import reference_scores
    from posttrain.models.run import load_model_for_inference

    model, tokenizer, cfg = load_model_for_inference(model_ref, device=device)
    system = cfg.template.system if cfg is not None else None
    items = read_prompts(data)
    rows = generate_file(model, tokenizer, items, out, batch_size=batch_size, system=system,
                         max_new_tokens=max_new_tokens, temperature=temperature)
    scored = [r for r in rows if r["reference"] is not None]
    if not scored:
        raise DataError(f"{data}: no reference answers to score against (predictions are in {out})")
    scores = reference_scores([r["prediction"] for r in scored], [r["reference"] for r in scored], segment)
    scores_path = Path(out).with_suffix(".scores.json")
    scores_path.write_text(json.dumps({"model": model_ref, "data": data, **scores}, indent=2), encoding="utf-8")
    return scores
