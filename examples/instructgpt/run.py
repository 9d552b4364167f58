"""The InstructGPT chain (Ouyang et al. 2022) end to end on SmolLM2-135M-Instruct, on the CPU, through the
`posttrain` commands and the YAML configs beside this file:

  1. data:       general chats (alpaca_en_demo) -> convert, dedup, filter, split into four disjoint sets:
                 SFT chats, prompts to rank (RM), PPO prompts, comparison prompts (with reference answers)
  2. sft:        LoRA SFT (sft.yaml), merged by `posttrain export` (the later stages' start and PPO's reference)
  3. candidates: K replies per RM prompt sampled from the SFT model (`posttrain data candidates`)
  4. ranks:      `posttrain data label` with a judge reward model trained on other data (examples/rm_lora.yaml:
                 prefs_broad + the dpo_en/zh demo pairs), never on these prompts or replies
  5. rm:         reward model on the K-way ranks (rm.yaml), from the SFT model
  6. ppo:        PPO-ptx with `reward.type: model` on that RM, ptx on the SFT chats (ppo.yaml)
  7. compare:    base vs SFT vs PPO, `posttrain eval compare` (Bradley-Terry, Elo, win rates); the
                 independent judge is `reference` (ROUGE-L against the held-out prompts' reference answers);
                 the same answers are also judged by the labelling RM and the chain RM, which PPO optimised
                 (directly or by proxy), so a gap between those and the independent judge shows reward hacking.

Each step prints the command it runs (in this process: `posttrain.cli.main` is the `posttrain` command) and
is skipped when its output exists, so a rerun resumes. From the repo root:

    python examples/instructgpt/run.py                        # fp32: about an hour on 2 CPU cores (estimate)
    python examples/instructgpt/run.py --smoke --work /tmp/ig # tiny-random model, a few steps: the wiring only
    python examples/instructgpt/run.py --precision bf16       # bf16 autocast: 25 min measured (AMX Xeon, 2 cores)
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

from posttrain.cli import main as posttrain_main

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ALPACA = REPO.parent / "shared" / "assets" / "data" / "llamafactory" / "alpaca_en_demo.json"
BASE = "smollm2-135m-instruct"

# Shares of the chats: (RM prompts, comparison prompts) from all, then PPO prompts from the rest.
# Full run: alpaca_en_demo 999 rows -> 985 after dedup -> 810 after the filter -> 51 RM prompts,
# 45 comparison prompts, 77 PPO prompts, 637 SFT chats (measured on the data steps alone).
SPLITS = {"full": (0.08, 0.05, 0.1), "smoke": (0.25, 0.2, 0.25)}
# K candidates per prompt and generation lengths: (k, candidate tokens, comparison tokens, rating rounds)
GENERATION = {"full": (4, 96, 96, 1000), "smoke": (3, 8, 8, 20)}
# Smoke overrides per stage: the tiny random model, one or two steps, short sequences.
SMOKE = {
    "sft": ["model.name_or_path=tiny-random", "train.max_steps=2", "data.max_length=128"],
    "judge": ["model.name_or_path=tiny-random", "train.max_steps=1", "train.epochs=1", "freeze.trainable_layers=1",
              "data.max_length=128", "data.val_size=2", "train.micro_batch_size=2"],
    "rm": ["train.max_steps=2", "freeze.trainable_layers=1", "data.max_length=128", "data.val_size=2"],
    "ppo": ["train.max_steps=2", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.max_new_tokens=8",
            "ppo.ptx_batch_size=2", "ppo.ptx_val_size=2", "ppo.sample_every=1"],
}


def posttrain(*args: str) -> None:
    """Run one `posttrain` command in this process; stop the chain if it fails."""
    print("$ posttrain " + " ".join(args), flush=True)
    start = time.time()
    rc = posttrain_main(list(args))
    gc.collect()  # the stage's models go before the next stage loads its own
    print(f"[exit {rc}, {time.time() - start:.0f} s]\n", flush=True)
    if rc != 0:
        sys.exit(f"instructgpt: `posttrain {args[0]} {args[1]}` failed with exit code {rc}")


def step(done: Path, *args: str) -> None:
    """posttrain(*args) unless `done` exists (a finished earlier run)."""
    if done.exists():
        print(f"# {done} exists: skipping posttrain {' '.join(args[:2])}\n", flush=True)
        return
    posttrain(*args)


def build_data(chats: Path, d: Path, mode: str) -> None:
    """convert -> dedup -> filter -> split twice: data/split/{train,val,test}, data/sft/{train,val}."""
    rm_share, compare_share, ppo_share = SPLITS[mode]
    step(d / "chats.jsonl", "data", "convert", str(chats), "--to", "openai", "--out", str(d / "chats.jsonl"))
    step(d / "dedup.jsonl", "data", "dedup", str(d / "chats.jsonl"), "--out", str(d / "dedup.jsonl"), "--near", "0.8")
    step(d / "clean.jsonl", "data", "filter", str(d / "dedup.jsonl"), "--out", str(d / "clean.jsonl"),
         "--rules", str(HERE / "rules.yaml"))
    step(d / "split" / "train.jsonl", "data", "split", str(d / "clean.jsonl"), "--out-dir", str(d / "split"),
         "--val", str(rm_share), "--test", str(compare_share), "--seed", "0")
    step(d / "sft" / "train.jsonl", "data", "split", str(d / "split" / "train.jsonl"), "--out-dir", str(d / "sft"),
         "--val", str(ppo_share), "--seed", "1")


def train(config: str, out: Path, overrides: list[str]) -> None:
    step(out / "train_summary.json", "train", str(HERE / config), f"output.dir={out}", *overrides)


def compare(w: Path, models: list[str], judge: str, name: str, tokens: int, rounds: int) -> Path:
    """`eval compare` of the models with one judge into w/compare-<name>; answers are shared between judges."""
    out = w / f"compare-{name}"
    first = w / "compare-reference" / "answers"
    if name != "reference" and first.is_dir():  # cached answers are keyed by model, weights, settings, prompt
        shutil.copytree(first, out / "answers", dirs_exist_ok=True)
    step(out / "report.md", "eval", "compare", "--models", ",".join(models), "--prompts",
         str(w / "data" / "split" / "test.jsonl"), "--judge", judge, "--out", str(out),
         "--max-new-tokens", str(tokens), "--rounds", str(rounds), "--device", "cpu")
    return out / "ratings.json"


def summarise(w: Path, ratings: dict[str, Path]) -> dict:
    """Each training stage's train_summary.json and each judge's Elo / Bradley-Terry ratings, in w/summary.json."""
    summary = {"stages": {s: json.loads((w / s / "train_summary.json").read_text())
                          for s in ("sft-lora", "judge-rm", "rm", "ppo")}, "judges": {}}
    for name, path in ratings.items():
        result = json.loads(path.read_text())
        summary["judges"][name] = {"judge": result["judge"], "report": str(path.parent / "report.md"),
                                   "elo": result["elo"], "bradley_terry": result["bradley_terry"]}
    (w / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def run(work: Path, chats: Path, smoke: bool, precision: str = "fp32") -> dict:
    mode = "smoke" if smoke else "full"
    w = work.resolve()
    d = w / "data"
    k, cand_tokens, cmp_tokens, rounds = GENERATION[mode]
    stages = ("sft", "judge", "rm", "ppo")
    extra = {s: [*(SMOKE[s] if smoke else []), f"train.precision={precision}"] for s in stages}
    base = "tiny-random" if smoke else BASE

    build_data(chats, d, mode)
    train("sft.yaml", w / "sft-lora", [f"data.datasets=[{{path: {d / 'sft' / 'train.jsonl'}}}]", *extra.get("sft", [])])
    step(w / "sft" / "config.json", "export", str(w / "sft-lora"), "--out", str(w / "sft"))
    train("../rm_lora.yaml", w / "judge-rm", extra.get("judge", []))
    step(w / "candidates.jsonl", "data", "candidates", str(d / "split" / "val.jsonl"), "--models", str(w / "sft"),
         "--k", str(k), "--temperature", "0.9", "--max-tokens", str(cand_tokens), "--seed", "0",
         "--out", str(w / "candidates.jsonl"), "--device", "cpu")
    step(w / "ranked.jsonl", "data", "label", str(w / "candidates.jsonl"), "--judge", str(w / "judge-rm"),
         "--out", str(w / "ranked.jsonl"))
    train("rm.yaml", w / "rm", [f"model.name_or_path={w / 'sft'}", f"data.datasets=[{{path: {w / 'ranked.jsonl'}}}]",
                                f"rm.normalize_data={d / 'split' / 'val.jsonl'}", *extra.get("rm", [])])
    train("ppo.yaml", w / "ppo", [f"model.name_or_path={w / 'sft'}", f"reward.model={w / 'rm'}",
                                  f"data.datasets=[{{path: {d / 'sft' / 'val.jsonl'}}}]",
                                  f"ppo.ptx_datasets=[{{path: {d / 'sft' / 'train.jsonl'}}}]", *extra.get("ppo", [])])
    models = [base, str(w / "sft"), str(w / "ppo")]
    judges = {"reference": "reference", "labeller": str(w / "judge-rm"), "chain-rm": str(w / "rm")}
    ratings = {name: compare(w, models, judge, name, cmp_tokens, rounds) for name, judge in judges.items()}
    return summarise(w, ratings)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="outputs/instructgpt", help="folder for every stage's output")
    p.add_argument("--chats", help=f"general chats for SFT and the prompt sets (default: {ALPACA}; "
                                   "--smoke: examples/data/general.jsonl)")
    p.add_argument("--smoke", action="store_true", help="tiny-random model, a few steps: checks the wiring only")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="train.precision of every training stage (bf16: on CPUs with AVX512_BF16/AMX and on GPUs)")
    a = p.parse_args(argv)
    chats = Path(a.chats) if a.chats else REPO / "examples" / "data" / "general.jsonl" if a.smoke else ALPACA
    summary = run(Path(a.work), chats.resolve(), a.smoke, a.precision)
    print(json.dumps(summary["judges"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
