"""easy-VQA (PyPI `easy-vqa==1.0`, MIT) -> posttrain's mllm layout: stage-1 captions and stage-2 Q&A.

    python examples/llava_easyvqa/make_data.py OUT_DIR [--train-images N] [--vqa-rows N]

Writes OUT_DIR/captions.jsonl (one "A blue circle." caption per training image, built from the image's
own question labels), OUT_DIR/vqa.jsonl (questions on the same images) and OUT_DIR/test.jsonl (held-out
questions on the test images). Image paths point into the installed easy_vqa package.

The training yes/no questions are balanced per wording: easy-VQA's "is there not a red shape?" is "yes" for
7 of 8 colours, so its wording alone answers most yes/no questions, and a model trained on them as they come
learns that prior instead of looking (tried: with the image and with a shuffled one it scored the same on
them). For every question template (the question with its colour or shape word taken out), as many "yes"
as "no" rows are kept (`--as-is` keeps them all). The held-out questions stay as they come.
"""

import argparse
import json
import random
import re
from pathlib import Path

import easy_vqa

SHAPES = ("circle", "rectangle", "triangle")
WORDS = re.compile(r"\b(circle|rectangle|triangle|red|green|blue|black|gray|teal|brown|yellow)\b")


def labels(texts, answers, image_ids) -> dict[int, dict]:
    """image id -> {"shape": ..., "color": ...} read off the questions that name them."""
    out: dict[int, dict] = {}
    for text, answer, image in zip(texts, answers, image_ids):
        if not text.startswith("what"):
            continue
        key = "shape" if answer in SHAPES else "color"
        out.setdefault(image, {})[key] = answer
    return out


def row(prompt: str, answer: str, image: str) -> dict:
    return {"messages": [{"role": "user", "content": f"<image>{prompt}"}, {"role": "assistant", "content": answer}],
            "images": [image]}


def balance_yes_no(rows: list[dict], rng: random.Random) -> list[dict]:
    """`rows` in their order, with the yes/no ones cut to as many "yes" as "no" per template."""
    groups: dict[tuple[str, str], list[int]] = {}
    for k, r in enumerate(rows):
        answer = r["messages"][1]["content"]
        if answer in ("yes", "no"):
            groups.setdefault((WORDS.sub("_", r["messages"][0]["content"]), answer), []).append(k)
    dropped: set[int] = set()
    for template in sorted({t for t, _ in groups}):  # sorted: set order would follow PYTHONHASHSEED
        yes, no = groups.get((template, "yes"), []), groups.get((template, "no"), [])
        bigger, n = (yes, len(no)) if len(yes) > len(no) else (no, len(yes))
        dropped.update(rng.sample(bigger, len(bigger) - n))
    return [r for k, r in enumerate(rows) if k not in dropped]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--vqa-rows", type=int, default=4000)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--as-is", action="store_true", help="keep the training yes/no questions unbalanced")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)

    texts, answers, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    images = sorted(labels(texts, answers, ids).items())[: args.train_images]
    captions = [row("Describe the image.", f"A {lab['color']} {lab['shape']}.", paths[i]) for i, lab in images
                if "shape" in lab and "color" in lab]
    kept = {i for i, _ in images}
    vqa = [row(t, a, paths[i]) for t, a, i in zip(texts, answers, ids) if i in kept]
    rng.shuffle(vqa)
    if not args.as_is:
        vqa = balance_yes_no(vqa, random.Random(1))
    write(args.out / "captions.jsonl", captions)
    write(args.out / "vqa.jsonl", vqa[: args.vqa_rows])

    texts, answers, ids = easy_vqa.get_test_questions()
    test_paths = easy_vqa.get_test_image_paths()
    test = [row(t, a, test_paths[i]) for t, a, i in zip(texts, answers, ids)]
    rng.shuffle(test)
    write(args.out / "test.jsonl", test[: args.test_rows])
    print(f"{len(captions)} captions, {min(len(vqa), args.vqa_rows)} training questions, "
          f"{min(len(test), args.test_rows)} test questions -> {args.out}")


if __name__ == "__main__":
    main()
