"""Which weights of a LLaVA model train, per method.type (vision.freeze_tower decides the tower).

- projector (LLaVA stage 1): only the projector; the LLM and the tower stay frozen.
- lora: LoRA on the language model's linears only (never the tower's: DINOv2 also names its attention
  q_proj/k_proj/v_proj/o_proj), the projector trained in full and saved with the adapter.
- full: everything but the frozen tower. freeze: the last N language-model blocks and the projector.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from posttrain.errors import ConfigError
from posttrain.models.config import Methods
from posttrain.models.methods import apply_lora, count_parameters
from posttrain.models.vision_config import VISION_METHODS, VisionConfig
from posttrain.models.fast_lora import enable_fast_lora
from posttrain.models.onednn_linear import enable_training_products

PROJECTOR = "multi_modal_projector"
TOWER = "vision_tower"
LANGUAGE_MODEL = "model.language_model."


def apply_vision_method(model: nn.Module, methods: Methods, vision: VisionConfig, fused: bool = True) -> nn.Module:
    """Set requires_grad (and wrap with LoRA) on a LlavaForConditionalGeneration for `methods.type`; fused: LoRA
    linears in one autograd op each (models/fast_lora.py), plain linear layers' training products through oneDNN on
    a CPU (models/onednn_linear.py)."""
    kind, train_tower = methods.type, not vision.freeze_tower
    if kind not in VISION_METHODS:
        raise ConfigError(f"method.type={kind} is not supported with a vision model; use one of "
                          f"{', '.join(VISION_METHODS)}")
    if kind == "lora":
        extra = [PROJECTOR] + ([TOWER] if train_tower else [])
        targets = language_model_linears(model, methods.lora.target_modules)
        lora = dataclasses.replace(methods.lora, target_modules=targets,
                                   modules_to_save=list(dict.fromkeys([*extra, *methods.lora.modules_to_save])))
        model = apply_lora(model, lora)
        if fused:
            enable_fast_lora(model)
            enable_training_products(model)
        return model
    layers = model.model.language_model.layers
    first = len(layers) - methods.freeze.trainable_layers if kind == "freeze" else len(layers)
    for name, param in model.named_parameters():
        in_llm = name.startswith(LANGUAGE_MODEL) or name.startswith("lm_head")
        if kind == "full":
            trains = in_llm
        elif kind == "freeze":
            block = _block_index(name)
            trains = (block is not None and block >= first) or any(m in name for m in methods.freeze.trainable_modules)
        else:  # projector
            trains = False
        param.requires_grad_(trains or PROJECTOR in name or (train_tower and TOWER in name))
    if count_parameters(model)[0] == 0:
        raise ConfigError(f"method.type={kind}: nothing would train")
    if fused:
        enable_training_products(model)
    return model


def _block_index(name: str) -> int | None:
    prefix = LANGUAGE_MODEL + "layers."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def language_model_linears(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the language model's nn.Linear modules that `targets` names ("all-linear": every one)."""
    every = targets == ["all-linear"]
    if "all-linear" in targets and not every:
        raise ConfigError("lora.target_modules: 'all-linear' cannot be combined with other names")
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.startswith(LANGUAGE_MODEL)
             and (every or name.rsplit(".", 1)[-1] in targets)]
    if not names:
        raise ConfigError(f"lora.target_modules {targets}: no such linear layer in the language model")
    return names
