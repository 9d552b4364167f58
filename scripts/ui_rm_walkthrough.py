"""The README's UI -> reward model walk-through, run on the real SmolLM2 in headless Chromium.

Pass 1 (no --ranks): starts `posttrain ui`, generates K=3 candidates for each prompt in the Annotate tab
with smollm2-135m-instruct, and prints them, numbered, so a person can read and rank them.
Pass 2 (--ranks): the same generation resumes from its saved file (nothing is sampled again), the given
ranks are typed into the Annotate tab item by item, Export is clicked, and the ranked export is printed.
Then train on it: posttrain train examples/rm_lora.yaml "data.datasets=[{path: EXPORT}]" ...

    PYTHONPATH=. python scripts/ui_rm_walkthrough.py                         # pass 1: read the candidates
    PYTHONPATH=. python scripts/ui_rm_walkthrough.py --ranks "2,1,3;1,3,2;..." # pass 2: one group per prompt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scripts.ui_screenshots import Page, ui_page

PROMPTS = [
    "Give me one tip for sleeping better.",
    "What is the capital of Italy?",
    "Describe a cat in one sentence.",
    "Suggest a name for a bakery.",
    "How do I boil an egg?",
    "Write a short thank-you note to a teacher.",
]


def generate(p: Page, workdir: Path) -> None:
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS)))
    p.tab("annotate")
    p.fill("gen-prompts", str(prompts))
    p.fill("gen-k", "3")
    p.fill("gen-temp", "0.9")
    p.fill("gen-max-tokens", "64")
    p.fill("gen-seed", "1")
    p.el("gen-start").click()
    print("generate:", p.wait("gen-status", lambda t: t.startswith(("done", "failed", "error")), 1800))
    p.wait("ann-progress", lambda t: t.startswith(f"0/{len(PROMPTS)}"), 60)


def show_candidates(workdir: Path) -> None:
    for path in sorted((workdir / "candidates").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            print(f"\n## {row['id']}: {row['prompt']}")
            for i, response in enumerate(row["responses"]):
                print(f"  [{i}] {response!r}")


def rank_all(p: Page, groups: list[list[int]]) -> str:
    for n, ranks in enumerate(groups):
        for i, rank in enumerate(ranks):
            p.fill(f"rank-{i}", str(rank))
        p.el("ann-submit").click()
        p.wait("ann-progress", lambda t, n=n: t.startswith(f"{n + 1}/"), 60)
    p.el("ann-export").click()
    export = p.wait("ann-export-out", lambda t: "exported" in t, 60)
    print("export:", export.replace("\n", " | "))
    return export.splitlines()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/posttrain-ui-rm")
    parser.add_argument("--port", type=int, default=7872)
    parser.add_argument("--ranks", help="ranks per prompt, prompts separated by ';', e.g. '2,1,3;1,3,2'")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with ui_page(workdir, args.port) as p:
        generate(p, workdir)
        if not args.ranks:
            show_candidates(workdir)
            return
        groups = [[int(r) for r in group.split(",")] for group in args.ranks.split(";")]
        ranked = Path(rank_all(p, groups))
        print(ranked)
        print(ranked.read_text())


if __name__ == "__main__":
    main()
