"""`posttrain eval ...`: a YAML benchmark run, or the ppl / generate / compare subcommands."""

from __future__ import annotations

import argparse
import json
import sys


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """`eval CONFIG.yaml [overrides]` or `eval {ppl,generate,compare} ...`, parsed by cmd_eval."""
    parser.add_argument("target", help="eval config YAML (multiple choice), or one of: ppl, generate, compare")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="overrides (YAML) or the subcommand's options")


def _sub_parser(name: str, parser_class) -> argparse.ArgumentParser:
    p = parser_class(prog=f"posttrain eval {name}")
    p.add_argument("--model", required=name != "compare", help="run dir, model folder, built-in or hub id")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    if name == "ppl":
        p.add_argument("--data", required=True, help="held-out file in any SFT layout")
        p.add_argument("--mask", default="all", choices=["all", "last", "full"], help="tokens scored (default all)")
        p.add_argument("--max-length", type=int, default=1024, help="token limit per sample (default 1024)")
        p.add_argument("--template", default="auto", help="chat template (default: the run's or the tokenizer's)")
    else:
        p.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default 256)")
    if name == "generate":
        p.add_argument("--data", required=True, help="prompts with reference answers (any SFT layout)")
        p.add_argument("--out", required=True, help="predictions JSONL; scores go to OUT.scores.json")
        p.add_argument("--segment", default="auto", choices=["auto", "char", "jieba"],
                       help="Chinese segmentation for BLEU/ROUGE (auto: jieba if installed, else characters)")
    if name == "compare":
        p.add_argument("--models", required=True, help="comma-separated model references (2 or more)")
        p.add_argument("--prompts", required=True, help="prompt file ({'prompt': ...} rows or any SFT layout)")
        p.add_argument("--out", required=True, help="folder for answers, votes.jsonl, ratings.json, report.md")
        p.add_argument("--judge", required=True, help="reward-model folder, or an OpenAI-compatible base URL")
        p.add_argument("--judge-model", default="gpt-4o-mini", help="model name sent to an LLM judge endpoint")
        p.add_argument("--judge-max-tokens", type=int, default=None,
                       help="reply length cap sent to an LLM judge (default: the endpoint's own)")
        p.add_argument("--epsilon", type=float, default=0.0, help="reward-model tie margin (default 0)")
        p.add_argument("--rounds", type=int, default=200, help="bootstrap resamples (default 200)")
    return p


def run_config(path: str, overrides: list[str]) -> int:
    from posttrain.config import load_config
    from posttrain.eval.multiple_choice import format_table, run
    from posttrain.eval.report import write_mc_report

    cfg = load_config(path, overrides, stage="eval")
    summary = run(cfg)
    print(format_table(summary))
    report = write_mc_report(__import__("pathlib").Path(cfg.eval.output_dir), summary)
    print(f"{summary['settings']['seconds']:.0f} s; results.json and {report} in {cfg.eval.output_dir}",
          file=sys.stderr)
    return 0


def main(target: str, rest: list[str], parser_class) -> int:
    if target not in ("ppl", "generate", "compare"):
        return run_config(target, rest)
    args = _sub_parser(target, parser_class).parse_args(rest)
    if target == "ppl":
        from posttrain.eval.perplexity import run_file

        result = run_file(args.model, args.data, mask=args.mask, max_length=args.max_length,
                          template=args.template, batch_size=args.batch_size, device=args.device)
    elif target == "generate":
        from posttrain.eval.generation import run

        result = run(args.model, args.data, args.out, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, segment=args.segment, device=args.device)
    else:
        from posttrain.eval.compare import run

        result = run([m.strip() for m in args.models.split(",") if m.strip()], args.prompts, args.out,
                     _make_judge(args), batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                     rounds=args.rounds, device=args.device)
        result = {k: result[k] for k in ("votes", "no_verdict", "win_rates", "bradley_terry")}
        print(f"report: {args.out}/report.md", file=sys.stderr)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _make_judge(args):
    from posttrain.eval.judges import OpenAIJudge, RewardModelJudge

    if args.judge.startswith(("http://", "https://")):
        return OpenAIJudge(args.judge, args.judge_model, max_tokens=args.judge_max_tokens)
    return RewardModelJudge(args.judge, epsilon=args.epsilon, device=args.device)
