"""Tokenized data as the training loop sees it: `Batches` (per-sample lengths and loss-token counts, and
a collate function from units to tensors), built here for SFT datasets and for preference samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from posttrain.data.collate import collate
from posttrain.data.preference import PrefSample, collate_preferences


@dataclass
class Batches:
    """A tokenized dataset as the loop sees it."""

    lengths: list[int]  # tokens per sample
    loss_tokens: list[int]  # supervised tokens per sample (the accumulation normaliser counts these)
    collate: Callable[[list[list[int]]], dict]  # units -> tensors (on CPU)


def sft_batches(dataset, pad_id: int) -> Batches:
    """Pull the tokenized columns into memory once; collation then indexes plain lists."""
    input_ids, weights = dataset["input_ids"], dataset["weights"]
    return Batches(
        lengths=[len(x) for x in input_ids],
        loss_tokens=[sum(1 for w in ws[1:] if w != 0) for ws in weights],
        collate=functools.partial(collate, input_ids=input_ids, weights=weights, pad_id=pad_id),
    )


def preference_batches(samples: list[PrefSample], pad_id: int, pack: bool = False,
                       share_prompt: bool = False) -> Batches:
    """One unit per prompt; loss_tokens=1 makes the loop's normaliser the prompt count.

    pack / share_prompt: see collate_preferences (DPO; a reward model reads one row per sequence)."""
    return Batches(lengths=[max(len(x) for x in s.input_ids) for s in samples], loss_tokens=[1] * len(samples),
                   collate=functools.partial(collate_preferences, samples=samples, pad_id=pad_id, pack=pack,
                                             share_prompt=share_prompt))
