"""The UI's Train tab: build a run config from a few choices, preview data, run `posttrain train`.

The run is a subprocess of the ordinary CLI (`python -m posttrain.cli train CONFIG`), so what the UI
starts is exactly what the command line would run; progress is read back from the run's
`logs/metrics.jsonl` and its log file. The form's model and data file pass the UI's checks (checks.py),
the run goes to <workdir>/runs/<plain name>, and extra overrides may set only the keys in
`OVERRIDE_KEYS`: numbers, switches and choices, never code references, remote code or paths.
The tab reads the training config only through `RunConfigs`, handed in by the CLI: serve never imports train.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.models.config import MethodConfig
from posttrain.typed_config import parse_override, save_yaml
from posttrain.data.formats import row_to_conversation
from posttrain.data.reading import read_rows, source_of
from posttrain.serve.api import ApiError
from posttrain.serve.ui.checks import Allowed, int_field, run_name

LOG_TAIL_CHARS = 4000
# Keys the Train tab's overrides may set, by section. Left out on purpose: reward.function / url / type
# (code to run, hosts to call), model.trust_remote_code / attn_implementation (hub kernels) / revision,
# and every path (output.dir, train.resume, rm.normalize_data, ppo.ptx_datasets, data.datasets, eval.*).
UI_OVERRIDES = {
    "model": "dtype",
    "data": "max_length val_size packing mask variables",
    "template": "name system",
    "lora": "r alpha dropout target_modules use_dora use_rslora init lr_ratio modules_to_save",
    "freeze": "trainable_layers trainable_modules",
    "quant": "quant_type double_quant compute_dtype",
    "lisa": "layers interval",
    "prompt": "num_virtual_tokens init_text prefix_projection",
    "optim": "lr weight_decay betas eps scheduler warmup_ratio max_grad_norm",
    "train": "epochs max_steps micro_batch_size grad_accum eval_every save_every keep_last log_every seed device "
             "loss_chunk",
    "output": "tensorboard",
    "rm": "center_coef",
    "dpo": "loss beta label_smoothing gamma sft_weight reference reference_cache",
    "ppo": "rollout_batch_size mini_batch_size ppo_epochs max_new_tokens temperature top_p stop_strings kl_estimator "
           "kl_coef kl_control kl_target kl_horizon gamma lam clip_range value_clip vf_coef entropy_coef "
           "whiten_advantages value_model sample_every",
    "grpo": "estimator group_size prompts_per_step mini_batch_size epochs max_new_tokens temperature top_p "
            "stop_strings clip_range kl_coef loss_norm sample_every",
    "reward": "model batch_size missing_eos_penalty normalize clip",
}
OVERRIDE_KEYS = frozenset(f"{section}.{key}" for section, keys in UI_OVERRIDES.items() for key in keys.split())
MODEL_KEYS = ("reward.model",)  # values are models, checked like the form's model (sets reward.type=model)


@dataclass(frozen=True)
class RunConfigs:
    """What the Train tab needs of the training config. `stages`: the stages a run config accepts;
    `resolve`: a run config as {dotted key: value} -> its resolved tree (what the run saves as config.yaml),
    raising PosttrainError for a wrong key or value, exactly as `posttrain train` would."""

    stages: tuple[str, ...]
    resolve: Callable[[dict], dict]


def choices(configs: RunConfigs | None) -> dict:
    """Stages and methods the config accepts (read from its types, so new stages appear here)."""
    return {"stages": list(configs.stages) if configs else [],
            "methods": list(typing.get_args(typing.get_type_hints(MethodConfig)["type"]))}


def build_config(form: dict, allowed: Allowed, configs: RunConfigs | None) -> tuple[dict, str]:
    """The resolved run config tree from the form (stage, model, data, method, max_steps, name, overrides)
    and its YAML."""
    if configs is None:
        raise ApiError(404, "this UI was started without training (posttrain ui has it)", code="no_training")
    name = run_name(form.get("name")) or time.strftime("ui-%Y%m%d-%H%M%S")
    tree = {"stage": form.get("stage") or "sft", "model.name_or_path": allowed.model(form.get("model")),
            "data.datasets": [{"path": str(allowed.file(form.get("data"), "data"))}],
            "method.type": form.get("method") or "lora", "train.max_steps": int_field(form, "max_steps", 0, 0, 10**9),
            "output.dir": str(allowed.workdir / "runs" / name), "output.tensorboard": False}
    resolved = configs.resolve(tree | checked_overrides(form.get("overrides"), allowed))
    return resolved, yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)


def checked_overrides(text, allowed: Allowed) -> dict:
    """{dotted key: value} from the form's `key=value` lines; a key off the allowlist is a 400."""
    if not isinstance(text, str | None):
        raise ApiError(400, "'overrides' must be text: one key=value per line", param="overrides")
    out = {}
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        key, value = parse_override(line)
        if key not in OVERRIDE_KEYS:
            raise ApiError(400, f"override {key!r} cannot be set from the UI (code references, remote code and paths "
                           f"stay on the command line); the Train tab takes: {', '.join(sorted(OVERRIDE_KEYS))}",
                           param="overrides")
        if key in MODEL_KEYS:
            value = allowed.model(value, key)
            out["reward.type"] = "model"
        out[key] = value
    return out


def preview(path: str | Path, page: int = 0, size: int = 5) -> dict:
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

    def __init__(self, tree: dict, workdir: Path):
        self.out_dir = Path(tree["output"]["dir"])
        self.config_path = workdir / "runs" / f"{self.out_dir.name}.yaml"
        self.log_path = workdir / "runs" / f"{self.out_dir.name}.log"
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        save_yaml(tree, self.config_path)
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
