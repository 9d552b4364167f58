"""Frozen linear weights stored in the autocast dtype when that loses nothing (LoRA under bf16 / fp16).

Autocast casts a linear's float32 weight to bf16 at every call, and caches only casts of weights
that require gradients: with a frozen base (LoRA) every step re-casts the whole base, and on a CPU
those copies are a visible share of the step (~40 ms of a 1.1 s one-row SFT-LoRA step of
SmolLM2-135M, benchmarks/README.md). Storing the frozen weight in bf16 gives the matmuls the same
operands (the cast is the same rounding) and halves that memory. It is done only where the rounding
loses nothing (the float32 values are already bf16 numbers, as when a bf16 checkpoint is loaded in
float32; the SmolLM2 copy shipped here holds float32 values, so it keeps its storage), so `restore`
gives back the loaded tensors bit for bit before
anything is saved or merged. Weights shared with another module (a head tied to the embeddings,
which are looked up outside autocast) keep their storage. Only for runs whose every model call goes
through the engine (under its autocast): text LoRA stages without sampling in the loop (GRPO's greedy
eval and the vision tower run outside it, and a bf16 weight meeting a float32 input there fails; routing
those through the engine would let this list go).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from posttrain.models.vision_load import wants_vision


def frozen_base_in_engine_calls(cfg) -> bool:
    """A LoRA base frozen for the whole run and only called through the engine: sft (text), rm, dpo, kto."""
    return (cfg.method.type == "lora" and cfg.stage in ("sft", "rm", "dpo", "kto")
            and not (cfg.stage == "sft" and wants_vision(cfg.model, cfg.vision)))


def store_frozen_linears(model: nn.Module, dtype: torch.dtype) -> list[nn.Parameter]:
    """Frozen float32 nn.Linear weights and biases whose values `dtype` holds exactly now stored in `dtype`;
    returns them (for `restore`)."""
    uses = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    stored = []
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        for param in (module.weight, module.bias):
            if param is None or param.requires_grad or param.dtype != torch.float32 or uses[id(param)] > 1:
                continue
            low = param.data.to(dtype)
            if torch.equal(low.float(), param.data):
                param.data = low
                stored.append(param)
    return stored


def restore(params: list[nn.Parameter]) -> None:
    """Back to float32 storage: exactly the loaded values (only lossless casts were made)."""
    for param in params:
        param.data = param.data.float()
