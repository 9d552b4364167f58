"""Losses as pure functions: tensors in, `(loss, metrics)` out. No transformers import here."""

from posttrain.losses.preference import LOSSES, REFERENCE_FREE, PairLogps, preference_loss
from posttrain.losses.reward import bradley_terry, pairwise_reward_loss
from posttrain.losses.sft import sft_loss, sft_loss_from_logps

__all__ = ["LOSSES", "REFERENCE_FREE", "PairLogps", "bradley_terry", "pairwise_reward_loss",
           "preference_loss", "sft_loss", "sft_loss_from_logps"]
