"""The anatomy of a causal LM, plain or PEFT-wrapped: the inner model, its decoder blocks, and the
split into backbone (final hidden states) and LM head, so losses apply the head only where loss is taken.

Methods (models/methods.py), LISA, the forward helpers and the stages read models through these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from posttrain.errors import ConfigError

# Attribute paths (under the causal LM's backbone) where decoder blocks live, by model family.
_LAYER_PATHS = ("layers", "h", "blocks", "decoder.layers", "encoder.layer")


def partitioned(param: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (tagged `ds_id`): whole only while its own module runs (ZeRO-3 gathers a
    module's weights in its forward hooks), so fused code that reads weights without running the module must
    take the module's own path instead."""
    return hasattr(param, "ds_id")


def is_prompt_learning(model: nn.Module) -> bool:
    """True for a PEFT model whose adapter adds virtual tokens (prompt / prefix tuning)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


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


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper (or `model` itself when not wrapped)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def context_length(model: nn.Module) -> int | None:
    """The model's context length (a LLaVA model keeps it in its text config)."""
    config = unwrap(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def lm_head_and_backbone(model: nn.Module) -> tuple[Callable[..., torch.Tensor], nn.Module]:
    """(backbone, head): `head(backbone(input_ids=..., attention_mask=...))` equals `model(...).logits`.

    The backbone returns the final hidden states (B, T, H) after the last norm. Under PEFT the
    LoRA layers are injected in place, so the unwrapped decoder already carries the adapters.
    Prompt / prefix tuning add virtual tokens inside PeftModel.forward, so there the backbone
    runs the PEFT model itself (the one switch for those methods).
    """
    if is_prompt_learning(model):
        return _virtual_token_backbone(model), unwrap(model).get_output_embeddings()
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


def _virtual_token_backbone(model: nn.Module) -> Callable[..., torch.Tensor]:
    """Hidden states (B, T, H) of the real tokens, through PeftModel.forward (virtual tokens added)."""

    def backbone(**inputs) -> torch.Tensor:
        # PEFT ignores position ids here (with a warning); validate() forbids packing for these methods.
        inputs.pop("position_ids", None)
        inputs.setdefault("use_cache", False)
        seq_len = inputs["input_ids"].shape[1]
        # logits_to_keep=1: the head runs on one position only; the caller applies it where loss is taken.
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1][:, -seq_len:]  # prompt tuning prepends its virtual tokens

    return backbone
