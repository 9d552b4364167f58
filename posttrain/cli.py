"""The `posttrain` command: parses arguments, then calls the library. Heavy imports stay lazy.

Errors the user can fix print as one line and exit with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from posttrain.cli_flags import add_dtype_flag, add_log_flags, add_trust_flag
from posttrain.curate.cli import add_data_parser
from posttrain.errors import ConfigError, PosttrainError
from posttrain.process import end_process
from posttrain.eval.cli import add_subcommands


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message otherwise)
        raise PosttrainError(f"{self.prog}: {message} (see --help)")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not user news
    import transformers  # start-up time: ~3 s, only for commands that load models or data

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import datasets  # start-up time: ~3 s, only for commands that load models or data

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def cmd_train(args) -> int:
    from posttrain.train.config import load_config  # start-up time: a command imports only what it runs

    cfg = load_config(args.config, args.overrides)  # an eval config (stage: eval) is an error naming posttrain eval
    _quiet_libraries()
    from posttrain.models.vision_load import wants_vision  # start-up time: a command imports only what it runs
    from posttrain.train import dpo, grpo, kto, ppo, rm, sft, sft_vision  # start-up time: only what runs

    stages = {"sft": sft_vision if wants_vision(cfg.model, cfg.vision) else sft, "rm": rm, "dpo": dpo, "kto": kto,
              "ppo": ppo, "grpo": grpo}
    summary = stages[cfg.stage].run(cfg)
    if summary.get("processes", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0
    if summary.get("already_complete"):
        print(f"{cfg.output.dir}: already complete ({summary['steps']} of {summary['total_steps']} steps); "
              "nothing to train, train_summary.json left as it was", file=sys.stderr)
        return 0
    loss = summary["final_train_loss"]
    print(f"saved {cfg.output.dir}: {summary['steps']} steps, final loss "
          f"{'n/a' if loss is None else format(loss, '.4f')}, {summary['tokens_per_s']:.0f} tokens/s, "
          f"{summary['wall_time_s']:.0f} s", file=sys.stderr)
    return 0


def _sampling(args) -> dict:
    return {"system": args.system, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p}


def cmd_chat(args) -> int:
    _quiet_libraries()
    from posttrain.records import Message  # start-up time: a command imports only what it runs
    from posttrain.models.run import load_model_for_inference  # start-up time: a command imports only what it runs
    from posttrain.models.generate import generate_reply  # start-up time: a command imports only what it runs
    from posttrain.serve.chat import run_repl  # start-up time: a command imports only what it runs

    model, tokenizer, cfg = load_model_for_inference(args.model, trust_remote_code=args.trust_remote_code,
                                                     dtype=args.dtype)
    if args.system is None and cfg is not None:
        args.system = cfg.template.system  # chat renders exactly as the run trained
    if args.image and args.prompt is None:
        raise PosttrainError("posttrain chat: --image goes with --prompt (in the chat itself: /image PATH)")
    if args.prompt is not None:
        from posttrain.serve.chat import prompt_images  # start-up time: a command imports only what it runs

        content, pixel_values = prompt_images(model, args.image, args.prompt)
        reply = generate_reply(model, tokenizer, [Message("user", content)], pixel_values=pixel_values,
                               **_sampling(args))
        print(reply)
        return 0
    run_repl(model, tokenizer, **_sampling(args))
    return 0


def cmd_export(args) -> int:
    _quiet_libraries()
    from posttrain.models.export import export_merged  # start-up time: a command imports only what it runs

    out = export_merged(args.run, args.out, trust_remote_code=args.trust_remote_code)
    print(f"exported {out}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    _quiet_libraries()
    from posttrain.eval.cli import main as eval_main  # start-up time: a command imports only what it runs

    return eval_main(args.target, args.rest, _Parser)


def _chat_log(args):
    from posttrain.serve.chatlog import ChatLog  # start-up time: a command imports only what it runs

    if args.log_dir is None:
        return None
    if args.log_max_mb <= 0:
        raise PosttrainError("--log-max-mb must be > 0")
    return ChatLog(args.log_dir, max_bytes=int(args.log_max_mb * 2**20))


def cmd_serve(args) -> int:
    _quiet_libraries()
    from posttrain.serve.api import Limits, serve  # start-up time: a command imports only what it runs

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("POSTTRAIN_API_KEY"),
          name=args.name, limits=Limits(max_tokens=args.max_tokens), chat_log=_chat_log(args),
          trust_remote_code=args.trust_remote_code, dtype=args.dtype, max_batch=args.max_batch)
    return 0


def cmd_ui(args) -> int:
    _quiet_libraries()
    from posttrain.serve.ui.app import run_ui  # start-up time: a command imports only what it runs

    run_ui(host=args.host, port=args.port, models=args.model, workdir=args.workdir, annotator=args.annotator,
           token=args.token or os.environ.get("POSTTRAIN_UI_TOKEN") or None, data_dirs=args.data_dir,
           chat_log=_chat_log(args), run_configs=ui_run_configs(), dtype=args.dtype)
    return 0


def ui_run_configs():
    """The training config as the UI's Train tab sees it, handed down from here: serve never imports train."""
    from posttrain.serve.ui.training import RunConfigs  # start-up time: a command imports only what it runs
    from posttrain.train.config import STAGES, resolve_tree  # start-up time: a command imports only what it runs

    return RunConfigs(stages=STAGES, resolve=resolve_tree)


def cmd_score(args) -> int:
    _quiet_libraries()
    from posttrain.eval.reward_accuracy import normalize_rewards, score_preferences  # start-up time: only what runs

    if not args.data and not args.normalize:
        raise ConfigError("posttrain score: give --data (score a preference file) and/or --normalize (set the offset)")
    result = {}
    if args.normalize:
        result["normalized"] = normalize_rewards(args.run, args.normalize, batch_size=args.batch_size,
                                                 strict=args.strict)
    if args.data:
        result |= score_preferences(args.run, args.data, batch_size=args.batch_size, strict=args.strict)
        scores = result.pop("scores")
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(s) + "\n" for s in scores)
    print(json.dumps(result, indent=2))
    return 0


def cmd_keys(args) -> int:
    from posttrain.eval.config import EvalRunConfig  # start-up time: a command imports only what it runs
    from posttrain.train.config import RunConfig  # start-up time: a command imports only what it runs
    from posttrain.typed_config import describe_keys  # start-up time: yaml, ~20 ms

    rows = describe_keys(RunConfig) + [row for row in describe_keys(EvalRunConfig) if row[0] != "stage"]
    for key, default, doc in rows:
        if not args.filter or args.filter in key:
            print(f"{key:36} {default:24} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser = _Parser(prog="posttrain", description="Post-training toolkit for LLMs.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub_add = sub.add_parser
    sub.add_parser = lambda *a, **k: sub_add(*a, parents=[common], **k)  # --debug after the command too

    p = sub.add_parser("train", help="train from a YAML config (+ dotted key=value overrides)")
    p.add_argument("config", help="run config YAML, e.g. examples/identity_lora.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.r=16 optim.lr=1e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("chat", help="chat with a run, model folder, built-in or hub id")
    p.add_argument("model", help="run dir (base + adapter), HF folder, built-in name or hub id")
    p.add_argument("--prompt", help="answer this one prompt on stdout, then exit")
    p.add_argument("--image", action="append", default=[], help="an image file shown with --prompt (vision models; "
                   "repeatable); in the chat itself: /image PATH")
    p.add_argument("--system", help="system prompt (default: the run's template.system or the template's)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    add_dtype_flag(p)
    add_trust_flag(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export", help="merge a LoRA run into a standalone HF model folder")
    p.add_argument("run", help="run dir written by posttrain train")
    p.add_argument("--out", required=True, help="folder to write (config, safetensors, tokenizer)")
    add_trust_flag(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="benchmarks (YAML), or eval ppl | generate | compare --help")
    add_subcommands(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API for a run, model folder, built-in or hub id")
    p.add_argument("model", help="run dir, HF folder, built-in name or hub id")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all: then set "
                   "--api-key, see SECURITY.md)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set POSTTRAIN_API_KEY)")
    p.add_argument("--name", help="model id clients send (default: the folder or model name)")
    p.add_argument("--max-tokens", type=int, default=1024, help="cap on max_tokens per request (default 1024)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together; requests beyond it queue and "
                   "join as rows end (default 32)")
    add_log_flags(p, "the request's 'user' field")
    add_dtype_flag(p)
    add_trust_flag(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="web UI: chat/arena, annotation, training (open the printed URL with its token)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; see SECURITY.md)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--model", action="append", default=[], help="model the UI may load (repeatable); runs inside "
                   "--workdir are offered too, nothing else")
    p.add_argument("--workdir", default="ui-data", help="folder for votes, annotations and UI-started runs; the UI "
                   "reads and writes files only here and in --data-dir folders")
    p.add_argument("--data-dir", action="append", default=[], help="another folder whose files (datasets, prompts, "
                   "candidates) the UI may read (repeatable)")
    p.add_argument("--token", help="the token the page and API clients must give (default: a new random one, "
                   "printed with the URL); POSTTRAIN_UI_TOKEN also sets it, out of sight of `ps`")
    p.add_argument("--annotator", default=None, help="default annotator name shown in the UI")
    add_log_flags(p, "the annotator name the page shows")
    add_dtype_flag(p)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("score", help="score preference data with a reward model: pairwise accuracy, margins")
    p.add_argument("run", help="reward-model run dir (stage rm) or HF sequence-classification folder")
    p.add_argument("--data", help="preference file (.jsonl/.json/.csv/.parquet) to score")
    p.add_argument("--normalize", metavar="FILE", help="first store reward_offset in RUN/config.json so FILE's "
                   "reference responses (chosen / top-ranked, or conversations' last reply) score 0 on average")
    p.add_argument("--batch-size", type=int, default=8, help="responses per forward pass (default 8)")
    p.add_argument("--out", help="also write each row's response rewards as JSON lines here")
    p.add_argument("--strict", action="store_true", help="stop at a row with a content problem (empty response, "
                   "chosen == rejected, too long) instead of dropping and counting it")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("keys", help="list every config key with its default and doc")
    p.add_argument("filter", nargs="?", help="only keys containing this text")
    p.set_defaults(func=cmd_keys)

    add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    if not debug:  # bitsandbytes warns on import, on AVX512-BF16 CPUs, about an optional bf16 kernel package
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # that fp32 runs never use
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("posttrain: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # ours: its message, exit 2; a bug or a library failure: one line too, exit 1
        if debug:
            raise
        if isinstance(err, PosttrainError):
            if not (isinstance(err, ConfigError) and os.environ.get("RANK", "0") != "0"):  # torchrun: every process
                print(f"posttrain: error: {err}", file=sys.stderr)  # reads the same config; rank 0 says it once
            return 2
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"posttrain: error: {type(err).__name__}: {first} (--debug shows the traceback)", file=sys.stderr)
        return 1


def entry() -> None:  # the posttrain command and python -m posttrain.cli: main(), then posttrain.process
    end_process(main())


if __name__ == "__main__":
    entry()
