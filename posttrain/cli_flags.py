"""Command-line flags that several `posttrain` commands share (chat, serve, ui, export, score)."""

from __future__ import annotations

import argparse


def add_log_flags(p: argparse.ArgumentParser, user: str) -> None:
    p.add_argument("--log-dir", help="log every answered request (time, model, user, messages, replies) as JSON "
                   f"lines in this folder; off unless given. The user is {user}")
    p.add_argument("--log-max-mb", type=float, default=50, help="rotate the log file at this size (default 50 MiB)")


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model folder's own Python code (config.json auto_map); only for folders you trust. "
                   "A run folder's config.yaml cannot switch this on")


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the weights' dtype (default: the run's model.dtype, else auto = float32 on a CPU, bfloat16 "
                   "on CUDA). bfloat16 decodes 1.5-1.7x faster than float32 at 8-32 rows on CPUs with AVX512_BF16 / "
                   "AMX, with other tokens than float32")
