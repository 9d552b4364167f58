"""Fine-tuning methods: decide which weights train (LoRA adapters, everything, or the last blocks).

`apply_method(model, cfg)` is the one entry point the stages call after loading the base model.
`lm_head_and_backbone(model)` splits a causal LM (plain or PEFT-wrapped) into decoder and head,
so the training loop can apply the head only at the positions that carry loss.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from posttrain.errors import ConfigError

# Attribute paths (under the causal LM's backbone) where decoder blocks live, by model family.
_LAYER_PATHS = ("layers", "h", "blocks", "decoder.layers", "encoder.layer")


def apply_method(model: nn.Module, cfg, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Prepare `model` for training under `cfg.method.type`; returns the (possibly wrapped) model.

    task_type SEQ_CLS (reward models) makes PEFT train and save the `score` head beside the adapters.
    """
    kind = cfg.method.type
    if kind == "lora":
        return _apply_lora(model, cfg.lora, task_type)
    if kind == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if kind == "freeze":
        return _apply_freeze(model, cfg.freeze)
    raise ConfigError(f"method.type {kind!r} is not one of lora, full, freeze")


def _apply_lora(model: nn.Module, lora_cfg, task_type: str = "CAUSAL_LM") -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    targets = list(lora_cfg.target_modules)
    # PEFT only expands the bare string "all-linear" (every linear but the output head).
    target_modules = "all-linear" if targets == ["all-linear"] else targets
    if "all-linear" in targets and len(targets) > 1:
        raise ConfigError("lora.target_modules: 'all-linear' cannot be combined with other names")
    peft_cfg = LoraConfig(
        task_type=TaskType[task_type], r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout, target_modules=target_modules,
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:  # e.g. "Target modules {...} not found in the base model"
        raise ConfigError(f"lora.target_modules {targets}: {err}") from None


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted prefix, ModuleList) of the decoder blocks of a Llama-like causal LM, plain or PEFT."""
    inner = unwrap(model)
    backbone = getattr(inner, "base_model", inner)
    prefix = "" if backbone is inner else inner.base_model_prefix + "."
    for path in _LAYER_PATHS:
        node = backbone
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return prefix + path, node
    # Fall back to the longest ModuleList anywhere: decoder stacks dwarf everything else.
    lists = [(name, mod) for name, mod in inner.named_modules() if isinstance(mod, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"freeze: cannot find the decoder blocks of {type(inner).__name__}")
    return max(lists, key=lambda item: len(item[1]))


def _apply_freeze(model: nn.Module, freeze_cfg) -> nn.Module:
    layers_prefix, layers = find_layers(model)
    n = freeze_cfg.trainable_layers
    if n < 0:
        raise ConfigError("freeze.trainable_layers must be >= 0")
    first = max(len(layers) - n, 0)
    # Names are relative to the unwrapped model; match "<prefix>.<index>." exactly so 1 != 10.
    layer_re = re.compile(re.escape(layers_prefix) + r"\.(\d+)\.")
    modules = list(freeze_cfg.trainable_modules)
    for name, param in unwrap(model).named_parameters():
        match = layer_re.match(name)
        in_tail = n > 0 and match is not None and int(match.group(1)) >= first
        param.requires_grad_(in_tail or any(m in name for m in modules))
    if count_parameters(model)[0] == 0:
        raise ConfigError(
            f"freeze: nothing would train (trainable_layers={n}, trainable_modules={modules}); "
            f"the model has {len(layers)} blocks")
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied tensors count once (parameters() de-duplicates)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper (or `model` itself when not wrapped)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def lm_head_and_backbone(model: nn.Module) -> tuple[Callable[..., torch.Tensor], nn.Module]:
    """(backbone, head): `head(backbone(input_ids=..., attention_mask=...))` equals `model(...).logits`.

    The backbone returns the final hidden states (B, T, H) after the last norm. Under PEFT the
    LoRA layers are injected in place, so the unwrapped decoder already carries the adapters.
    """
    inner = unwrap(model)
    decoder = getattr(inner, "base_model", None)
    head = inner.get_output_embeddings()
    if decoder is None or decoder is inner or head is None:
        raise ConfigError(f"{type(inner).__name__}: cannot split into decoder and LM head")
    if getattr(inner.config, "final_logit_softcapping", None):
        # Gemma-2 style soft-capping sits between head and logits: the split would drift.
        raise ConfigError(f"{type(inner).__name__}: logit soft-capping is not supported by the split head")

    def backbone(**inputs) -> torch.Tensor:
        inputs.setdefault("use_cache", False)  # training never needs the KV cache
        return decoder(**inputs).last_hidden_state  # (B, T, H)

    return backbone, head
