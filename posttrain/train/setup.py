"""What every stage does to its loaded model before the loop: apply the run's method, and collect what the
loop needs from it (AdamW groups, LISA's per-step hook) and what the log reports (parameter counts)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from posttrain.models.methods import apply_method, count_parameters, optimizer_groups, step_hook
from posttrain.train.config import RunConfig
from posttrain.train.loop import StepHook


@dataclass
class Prepared:
    model: nn.Module  # the base with the method applied (possibly PEFT-wrapped)
    param_groups: list[dict]  # AdamW groups: LoRA+ gives B its own lr; LISA hands over every block
    hook: StepHook | None  # LISA re-draws its blocks before each update; None for other methods
    trainable: int  # parameters that get gradients in one step (LISA: the always-on set and its active blocks)
    total: int


def prepare_model(model: nn.Module, cfg: RunConfig, task_type: str = "CAUSAL_LM", fused: bool = True) -> Prepared:
    """Apply cfg's method to a loaded base (task_type SEQ_CLS: a reward model, whose head always trains;
    fused: models/forward.py FastPaths)."""
    model = apply_method(model, cfg.methods, task_type=task_type, fused=fused,
                         base_model=cfg.model.name_or_path)
    hook = step_hook(model, cfg.methods, cfg.train.seed)
    trainable, total = count_parameters(model)
    if hook is not None:  # LISA: what trains in one step (the frozen blocks take turns)
        trainable = hook.trainable_per_step(model)
    return Prepared(model, optimizer_groups(model, cfg.methods, cfg.optim.lr), hook, trainable, total)
