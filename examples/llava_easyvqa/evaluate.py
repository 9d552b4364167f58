"""Held-out VQA accuracy of a run, beside the same questions asked with the wrong images (the control).

    python examples/llava_easyvqa/evaluate.py RUN_DIR TEST_JSONL [--out results.json]

Greedy answers, exact match after normalising (lower case, no punctuation). The control pairs every
question with the image of the next question in the file: what it still gets right comes from answer
priors alone, so the gap between the two numbers is what the image contributes.
"""

import argparse
import json
import string
from pathlib import Path

from posttrain.data.images import load_image
from posttrain.models.generate import generate_from_ids
from posttrain.models.run import load_model_for_inference
from posttrain.models.vision_load import image_inputs_of
from posttrain.records import Message
from posttrain.templates.render import encode_prompt


def normalise(text: str) -> str:
    return text.lower().translate(str.maketrans("", "", string.punctuation)).strip()


def answers(model, tokenizer, system, questions: list[str], images: list[str], batch: int) -> list[str]:
    vision = image_inputs_of(model)
    out = []
    for start in range(0, len(questions), batch):
        qs, ims = questions[start:start + batch], images[start:start + batch]
        prompts = [encode_prompt([Message("user", q)], tokenizer, system=system) for q in qs]
        pixels = vision.pixel_values([load_image(p) for p in ims])
        out += [g.text for g in generate_from_ids(model, tokenizer, prompts, max_new_tokens=6, pixel_values=pixels)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("test", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.test.read_text().splitlines()]
    questions = [r["messages"][0]["content"] for r in rows]
    truth = [r["messages"][1]["content"] for r in rows]
    images = [r["images"][0] for r in rows]
    model, tokenizer, cfg = load_model_for_inference(args.run, device="cpu")
    system = cfg.template.system if cfg is not None else None
    matched = answers(model, tokenizer, system, questions, images, args.batch)
    shuffled = answers(model, tokenizer, system, questions, images[1:] + images[:1], args.batch)

    def accuracy(said: list[str]) -> float:
        return sum(normalise(s) == normalise(t) for s, t in zip(said, truth)) / len(truth)

    result = {"questions": len(rows), "accuracy": accuracy(matched), "accuracy_shuffled_images": accuracy(shuffled),
              "samples": [{"question": q.replace("<image>", ""), "truth": t, "answer": a, "answer_shuffled": s}
                          for q, t, a, s in list(zip(questions, truth, matched, shuffled))[:8]]}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
