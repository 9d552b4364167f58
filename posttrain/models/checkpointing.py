"""Gradient checkpointing: each decoder block's activations are recomputed during backward.

Non-reentrant (`use_reentrant=False`): gradients reach LoRA weights inside a block whose inputs do not
require grad, and FSDP2's hooks stay outside the recomputed region (transformers checkpoints a block's
`forward`, not its `__call__`). The recompute runs in backward, after the forward's packed-attention
block has closed; `recompute_context` re-enters it, so packed rows and
shared prompts attend exactly as in the forward pass.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from posttrain.errors import ConfigError
from posttrain.models.packed_attention import recompute_context


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Switch it on for every transformers model inside `model` (policy, critic, ...); returns how many."""
    kwargs = {"use_reentrant": False, "context_fn": recompute_context}
    count = 0
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not module.is_activation_checkpointing:
            if not module.supports_gradient_checkpointing:
                raise ConfigError(f"train.gradient_checkpointing: {type(module).__name__} does not support it")
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            count += 1
    if count == 0:
        raise ConfigError(f"train.gradient_checkpointing: no transformers model inside {type(model).__name__}")
    return count
