"""The UI's Train tab: build a run config from a few choices, preview data, run `posttrain train`.

The run is a subprocess of the ordinary CLI (`python -m posttrain.cli train CONFIG`), so what the UI
starts is exactly what the command line would run; progress is read back from the run's
`logs/metrics.jsonl` and its log file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

from posttrain.config import MethodConfig, RunConfig, load_config, save_config, to_dict
from posttrain.data.formats import row_to_conversation
from posttrain.data.reading import read_rows, source_of

LOG_TAIL_CHARS = 4000


def choices() -> dict:
    """Stages and methods the config accepts (read from its types, so new stages appear here)."""
    hints = typing.get_type_hints(RunConfig)
    return {"stages": list(typing.get_args(hints["stage"])),
            "methods": list(typing.get_args(typing.get_type_hints(MethodConfig)["type"]))}


def build_config(form: dict, workdir: Path) -> tuple[RunConfig, str]:
    """RunConfig from the form (stage, model, data, method, max_steps, name, overrides) and its YAML."""
    import yaml

    name = form.get("name") or time.strftime("ui-%Y%m%d-%H%M%S")
    tree = {"stage": form.get("stage") or "sft", "model.name_or_path": form.get("model") or "tiny-random",
            "data.datasets": [{"path": form.get("data", "")}], "method.type": form.get("method") or "lora",
            "train.max_steps": int(form.get("max_steps") or 0), "output.dir": str(workdir / "runs" / name),
            "output.tensorboard": False}
    overrides = [line for line in str(form.get("overrides") or "").splitlines() if line.strip()]
    cfg = load_config(None, overrides, **tree)
    return cfg, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def preview(path: str, page: int = 0, size: int = 5) -> dict:
    """One page of a dataset as chat messages, through the same parsing as training."""
    rows = read_rows(path)
    start = page * size
    out = []
    for i in range(start, min(start + size, len(rows))):
        conv = row_to_conversation(rows[i], "auto", source=source_of(path, i))
        out.append({"row": i, "text": conv.text,
                    "messages": [{"role": m.role, "content": m.content} for m in conv.messages]})
    return {"rows": out, "page": page, "size": size, "total": len(rows)}


class TrainJob:
    """One training subprocess started from the UI."""

    def __init__(self, cfg: RunConfig, workdir: Path):
        self.out_dir = Path(cfg.output.dir)
        self.config_path = workdir / "runs" / f"{self.out_dir.name}.yaml"
        self.log_path = workdir / "runs" / f"{self.out_dir.name}.log"
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("w", encoding="utf-8") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "posttrain.cli", "train", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the run stops; checkpoints already written stay
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def status(self) -> dict:
        code = self.proc.poll()
        log = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.is_file() else ""
        return {"run": self.out_dir.name, "dir": str(self.out_dir), "running": code is None, "returncode": code,
                "log": log[-LOG_TAIL_CHARS:], "loss": self.losses()}

    def losses(self) -> list[dict]:
        metrics = self.out_dir / "logs" / "metrics.jsonl"
        if not metrics.is_file():
            return []
        points = []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if rec.get("split") == "train" and "loss" in rec:
                points.append({"step": rec["step"], "loss": rec["loss"]})
        return points
