"""Losses as pure functions: tensors in, `(loss, metrics)` out. No transformers import here."""

from posttrain.losses.sft import sft_loss

__all__ = ["sft_loss"]
