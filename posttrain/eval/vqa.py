"""Visual question answering accuracy of a vision-language model, beside a shuffled-image control.

Each row of the data file is a conversation with images (LLaMA-Factory's mllm layout, sharegpt with
`images`, or OpenAI image_url parts) whose last assistant turn is the reference answer. Greedy answers
are scored by exact match after `normalise_answer`. The control asks every question again with other
questions' images: the distinct images are put in a seeded random order and each is replaced by the next
one, so no question keeps its own image and the mix of images stays the same. What the control still gets
right comes from answer priors alone; the gap between the two accuracies is what the image contributes.
"""

from __future__ import annotations

import json
import logging
import random
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.formats import row_to_conversation
from posttrain.data.images import load_image, resolve
from posttrain.data.reading import read_rows, source_of
from posttrain.errors import DataError
from posttrain.eval.progress import Progress
from posttrain.models.generate import generate_from_ids
from posttrain.models.load import pick_device
from posttrain.models.onednn_linear import onednn_linears
from posttrain.models.run import load_model_for_inference
from posttrain.models.vision_load import image_inputs_of
from posttrain.records import IMAGE_PLACEHOLDER, Message
from posttrain.templates.render import encode_prompt

log = logging.getLogger("posttrain")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
SAMPLES_IN_SUMMARY = 8


def normalise_answer(text: str) -> str:
    """What exact match compares (the VQA benchmark's rules, simplified): lower case, punctuation and the
    articles a / an / the removed, whitespace collapsed. "The circle." == "circle"; "Yes!" == "yes"."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


@dataclass
class VQAItem:
    source: str  # file and line, for messages
    messages: list[Message]  # ends with the question (a user turn holding the image placeholders)
    images: list[str]  # resolved paths / data URLs, in placeholder order
    reference: str


def read_vqa(path: str | Path, max_questions: int | None = None) -> list[VQAItem]:
    """VQA items in file order; a row without an image or without a final reference answer is an error naming
    its file and line (a VQA file is a test set: no row is dropped silently)."""
    items = []
    for i, row in enumerate(read_rows(path)):
        if max_questions is not None and len(items) >= max_questions:
            break
        source = source_of(path, i)
        conv = row_to_conversation({k: v for k, v in row.items() if k not in ("id", "category")}, "auto",
                                   source=source, images=True)
        messages = list(conv.messages)
        if len(messages) < 2 or messages[-1].role != "assistant" or messages[-2].role != "user":
            raise DataError(f"{source}: a VQA row must end with a question (user) and its reference answer "
                            "(assistant)")
        if not conv.images:
            raise DataError(f"{source}: field 'images': a VQA row needs at least one image")
        images = [resolve(ref, Path(path).parent) for ref in conv.images]
        items.append(VQAItem(source, messages[:-1], images, messages[-1].content))
    if not items:
        raise DataError(f"{path}: no VQA rows")
    return items


def shuffled_images(items: list[VQAItem], seed: int) -> list[list[str]]:
    """Each item's images with every distinct image replaced by the next one in a seeded random order (a
    derangement: no question keeps its own image)."""
    distinct = sorted({ref for it in items for ref in it.images})
    if len(distinct) < 2:
        raise DataError("the shuffled-image control needs at least two different images in the VQA file")
    random.Random(seed).shuffle(distinct)
    swap = {ref: distinct[(k + 1) % len(distinct)] for k, ref in enumerate(distinct)}
    return [[swap[ref] for ref in it.images] for it in items]


def answer(model, tokenizer, items: list[VQAItem], images: list[list[str]], *, system: str | None,
           batch_size: int, max_new_tokens: int, progress: Progress | None = None) -> list[str]:
    """Greedy answers to each item's question with the given images (in placeholder order)."""
    vision = image_inputs_of(model)
    decoded: dict[str, object] = {}  # ref -> PIL image: the control reuses the same images
    replies = []
    with onednn_linears(model):  # fixed weights: their oneDNN copies made once for all the batches
        for start in range(0, len(items), batch_size):
            chunk, chunk_images = items[start:start + batch_size], images[start:start + batch_size]
            prompts = [encode_prompt(it.messages, tokenizer, system=system) for it in chunk]
            refs = [ref for refs in chunk_images for ref in refs]
            for ref in refs:
                if ref not in decoded:
                    decoded[ref] = load_image(ref, f"{chunk[0].source} images")
            pixels = vision.pixel_values([decoded[ref] for ref in refs])
            gens = generate_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, pixel_values=pixels)
            replies += [g.text for g in gens]
            if progress is not None:
                progress.update(len(chunk))
    return replies


def run(ev) -> dict:
    """Accuracy with the right images and with shuffled ones for ev.vqa; answers.jsonl and results.json in
    ev.output_dir. Returns the summary."""
    vqa = ev.vqa
    out_dir = Path(ev.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = read_vqa(vqa.data, vqa.max_questions)
    control = shuffled_images(items, vqa.seed)
    model, tokenizer, cfg = load_model_for_inference(ev.model, device=str(pick_device(ev.device)))
    if image_inputs_of(model) is None:
        raise DataError(f"{ev.model} takes no images (it has no vision tower): VQA needs a vision-language model")
    system = cfg.template.system if cfg is not None else None
    kwargs = {"system": system, "batch_size": ev.batch_size, "max_new_tokens": vqa.max_new_tokens}
    start = time.time()
    with Progress(2 * len(items), "vqa", "answer") as progress:
        matched = answer(model, tokenizer, items, [it.images for it in items], progress=progress, **kwargs)
        shuffled = answer(model, tokenizer, items, control, progress=progress, **kwargs)
    seconds = time.time() - start
    rows = []
    for it, said, said_control, control_images in zip(items, matched, shuffled, control):
        truth = normalise_answer(it.reference)
        rows.append({"source": it.source, "question": it.messages[-1].content.replace(IMAGE_PLACEHOLDER, "").strip(),
                     "reference": it.reference, "images": it.images, "answer": said,
                     "correct": normalise_answer(said) == truth, "control_images": control_images,
                     "control_answer": said_control, "control_correct": normalise_answer(said_control) == truth})
    with (out_dir / "answers.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    n = len(rows)
    accuracy = sum(r["correct"] for r in rows) / n
    control_accuracy = sum(r["control_correct"] for r in rows) / n
    summary = {"questions": n, "accuracy": accuracy, "accuracy_shuffled_images": control_accuracy,
               "image_gap": accuracy - control_accuracy,
               "samples": [{k: r[k] for k in ("question", "reference", "answer", "control_answer")}
                           for r in rows[:SAMPLES_IN_SUMMARY]],
               "settings": {"model": ev.model, "data": vqa.data, "max_new_tokens": vqa.max_new_tokens,
                            "seed": vqa.seed, "batch_size": ev.batch_size, "decoding": "greedy",
                            "match": "exact, after lower case, no punctuation, no articles, collapsed spaces",
                            "seconds": round(seconds, 1)}}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def format_summary(summary: dict) -> str:
    """The two accuracies and the gap, one line each, then a few sample answers."""
    n = summary["questions"]
    lines = [f"VQA accuracy ({n} questions): {100 * summary['accuracy']:.1f}%",
             f"same questions, shuffled images: {100 * summary['accuracy_shuffled_images']:.1f}%",
             f"what the image contributes: {100 * summary['image_gap']:+.1f} points"]
    for s in summary["samples"]:
        lines.append(f"  {s['question']!r}: reference {s['reference']!r}, answer {s['answer']!r}, "
                     f"with a wrong image {s['control_answer']!r}")
    return "\n".join(lines)
