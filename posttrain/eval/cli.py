"""`posttrain eval ...`: a YAML eval run (multiple choice, compare or vqa), or the ppl / generate / compare / vqa
subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """`eval CONFIG.yaml [overrides]` or `eval {ppl,generate,compare} ...`, parsed by cmd_eval."""
    parser.add_argument("target", help="eval config YAML (eval.task mc, compare or vqa), or one of: ppl, generate, "
                        "compare, vqa, ratings")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="overrides (YAML) or the subcommand's options")


STRICT_HELP = "stop at a prompt row with a content problem (a blank prompt) instead of dropping and counting it"

# optional `eval compare` flags -> config keys
_COMPARE_FLAGS = (("judge_model", str, "eval.compare.judge_model"),
                  ("judge_max_tokens", int, "eval.compare.judge_max_tokens"),
                  ("epsilon", float, "eval.compare.epsilon"), ("rounds", int, "eval.compare.rounds"),
                  ("max_new_tokens", int, "eval.compare.max_new_tokens"),
                  ("batch_size", int, "eval.batch_size"), ("device", str, "eval.device"))
# optional `eval vqa` flags -> config keys
_VQA_FLAGS = (("max_new_tokens", int, "eval.vqa.max_new_tokens"), ("max_questions", int, "eval.vqa.max_questions"),
              ("seed", int, "eval.vqa.seed"), ("batch_size", int, "eval.batch_size"), ("device", str, "eval.device"))
SUBCOMMANDS = ("ppl", "generate", "compare", "vqa", "ratings")


def _ratings_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("votes", nargs="+", help="vote files: the UI's ui-data/votes.jsonl, eval compare's votes.jsonl")
    p.add_argument("--out", required=True, help="folder for ratings.json, report.md and the plots")
    p.add_argument("--judge", action="append", default=[], help="rate only votes whose judge starts with this "
                   "(repeatable), e.g. human, llm:, reward_model:")
    p.add_argument("--annotator", action="append", default=[], help="rate only this person's votes (repeatable; "
                   "same as --judge human:NAME)")
    p.add_argument("--models", help="comma-separated models to rate; votes naming others are counted unknown_model")
    p.add_argument("--rounds", type=int, default=200, help="bootstrap resamples (default 200)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return p


def _config_flags(p: argparse.ArgumentParser, flags) -> None:
    """Optional flags whose help and defaults are the config schema's (a flag not given keeps the default)."""
    from posttrain.eval.config import EvalRunConfig  # start-up time: only the command that runs
    from posttrain.typed_config import describe_keys  # start-up time: yaml, ~20 ms

    docs = {key: f"{doc} (default {default})" for key, default, doc in describe_keys(EvalRunConfig)}
    for flag, kind, key in flags:
        p.add_argument("--" + flag.replace("_", "-"), type=kind, default=None, help=docs[key])


def _sub_parser(name: str, parser_class) -> argparse.ArgumentParser:
    p = parser_class(prog=f"posttrain eval {name}")
    if name == "ratings":
        return _ratings_parser(p)
    if name == "vqa":  # flags become eval.vqa.* overrides
        p.add_argument("--model", required=True, help="a vision-language run dir, LLaVA folder or built-in")
        p.add_argument("--data", required=True, help="image questions with reference answers (mllm / sharegpt "
                                                     "`images`, OpenAI image_url parts)")
        p.add_argument("--out", required=True, help="folder for results.json and answers.jsonl")
        _config_flags(p, _VQA_FLAGS)
        return p
    if name == "compare":  # flags become eval.compare.* overrides: the defaults live in the config schema
        p.add_argument("--models", required=True, help="comma-separated model references (2 or more)")
        p.add_argument("--prompts", required=True, help="prompt file ({'prompt', 'reference'?, 'category'?} rows "
                                                        "or any SFT layout)")
        p.add_argument("--out", required=True, help="folder for answers, votes.jsonl, ratings.json, report.md")
        p.add_argument("--judge", required=True, help="reward-model folder, OpenAI-compatible base URL, or "
                                                      "'reference' (ROUGE-L against each prompt's reference)")
        _config_flags(p, _COMPARE_FLAGS)
        p.add_argument("--strict", action="store_true", help=STRICT_HELP)
        return p
    p.add_argument("--model", required=True, help="run dir, model folder, built-in or hub id")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    if name == "ppl":
        p.add_argument("--data", required=True, help="held-out file in any SFT layout")
        p.add_argument("--mask", default="all", choices=["all", "last", "full"], help="tokens scored (default all)")
        p.add_argument("--max-length", type=int, default=1024, help="token limit per sample (default 1024)")
        p.add_argument("--template", default="auto", help="chat template (default: the run's or the tokenizer's)")
    else:
        p.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default 256)")
        p.add_argument("--data", required=True, help="prompts with reference answers (any SFT layout)")
        p.add_argument("--out", required=True, help="predictions JSONL; scores go to OUT.scores.json")
        p.add_argument("--strict", action="store_true", help=STRICT_HELP)
        p.add_argument("--segment", default="auto", choices=["auto", "char", "jieba"],
                       help="CJK tokens for ROUGE: characters (auto, char) or jieba words; BLEU is sacrebleu "
                            "with tokenize zh when references have CJK text, else 13a")
    return p


def _flags_config(args, flags, extra: dict):
    """The eval config that a subcommand's flags stand for (only the flags given override defaults)."""
    from posttrain.eval.config import load_eval_config  # start-up time: only the command that runs

    for flag, _, key in flags:
        if getattr(args, flag) is not None:
            extra[key] = getattr(args, flag)
    return load_eval_config(None, [], **extra).eval


def _compare_config(args):
    extra = {"eval.task": "compare", "eval.output_dir": args.out, "eval.compare.prompts": args.prompts,
             "eval.compare.judge": args.judge,
             "eval.compare.models": [m.strip() for m in args.models.split(",") if m.strip()]}
    if args.strict:
        extra["eval.compare.strict"] = True
    return _flags_config(args, _COMPARE_FLAGS, extra)


def _vqa_config(args):
    extra = {"eval.task": "vqa", "eval.output_dir": args.out, "eval.model": args.model, "eval.vqa.data": args.data}
    return _flags_config(args, _VQA_FLAGS, extra)


def _print_compare(result: dict) -> None:
    keep = ("judge", "read", "left_out", "malformed_lines", "votes", "ties", "no_verdict", "win_rates",
            "win_matrix", "bradley_terry", "elo", "by_category")
    print(json.dumps({k: result[k] for k in keep if k in result}, indent=2, ensure_ascii=False))
    print(f"report: {result['report']}", file=sys.stderr)


def run_config(ev) -> int:
    """Run an eval section: a multiple-choice benchmark (table on stdout), a comparison (JSON) or VQA (accuracy
    beside the shuffled-image control)."""
    if ev.task == "vqa":
        from posttrain.eval.vqa import format_summary, run as run_vqa  # start-up time: only the command that runs

        summary = run_vqa(ev)
        print(format_summary(summary))
        print(f"{summary['settings']['seconds']:.0f} s; results.json and answers.jsonl in {ev.output_dir}",
              file=sys.stderr)
        return 0
    if ev.task == "compare":
        from posttrain.eval.compare import run  # start-up time: only the command that runs

        _print_compare(run(ev))
        return 0
    from posttrain.eval.multiple_choice import format_table, run  # start-up time: only the command that runs
    from posttrain.eval.report import write_mc_report  # start-up time: only the command that runs

    summary = run(ev)
    print(format_table(summary))
    report = write_mc_report(Path(ev.output_dir), summary)
    s = summary["settings"]
    print(f"{s['seconds']:.0f} s ({s['scored']} questions scored, {s['cached']} from the cache); "
          f"results.json and {report} in {ev.output_dir}", file=sys.stderr)
    return 0


def main(target: str, rest: list[str], parser_class) -> int:
    if target not in SUBCOMMANDS:
        from posttrain.eval.config import load_eval_config  # start-up time: only the command that runs

        return run_config(load_eval_config(target, rest).eval)
    args = _sub_parser(target, parser_class).parse_args(rest)
    if target == "compare":
        return run_config(_compare_config(args))
    if target == "vqa":
        return run_config(_vqa_config(args))
    if target == "ratings":
        from posttrain.eval.votes import rate_votes  # start-up time: only the command that runs

        models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
        result = rate_votes(args.votes, args.out, judges=args.judge, annotators=args.annotator, models=models,
                            rounds=args.rounds, seed=args.seed)
        _print_compare(result)
        return 0
    if target == "ppl":
        from posttrain.eval.perplexity import run_file  # start-up time: only the command that runs

        result = run_file(args.model, args.data, mask=args.mask, max_length=args.max_length,
                          template=args.template, batch_size=args.batch_size, device=args.device)
    else:
        from posttrain.eval.generation import run  # start-up time: only the command that runs

        result = run(args.model, args.data, args.out, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, segment=args.segment, device=args.device,
                     strict=args.strict)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0
