"""Tokenized data as the training loop sees it: `Batches` (per-sample lengths and loss-token counts, and
a collate function from units to tensors), built here for SFT datasets, preference and KTO samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.data.collate import collate
from posttrain.data.kto import KTOSample
from posttrain.data.preference import PrefSample
from posttrain.data.preference_batch import collate_preferences


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


ImageTensors = Callable[[list[str]], dict]  # image refs -> {"image_features": (N, T, D)} or {"pixel_values": ...}


def vision_collate(units: list[list[int]], *, images: list[list[str]], image_tensors: ImageTensors, **text) -> dict:
    """The text collate plus the images of every sample in the micro-batch, in token order."""
    batch = collate(units, **text)
    return batch | image_tensors([ref for unit in units for i in unit for ref in images[i]])


def vision_sft_batches(dataset, pad_id: int, image_tensors: ImageTensors) -> Batches:
    """SFT batches whose samples carry images (the dataset's `images` column, refs in token order)."""
    input_ids, weights = dataset["input_ids"], dataset["weights"]
    return Batches(
        lengths=[len(x) for x in input_ids],
        loss_tokens=[sum(1 for w in ws[1:] if w != 0) for ws in weights],
        collate=functools.partial(vision_collate, images=dataset["images"], image_tensors=image_tensors,
                                  input_ids=input_ids, weights=weights, pad_id=pad_id),
    )


def preference_batches(samples: list[PrefSample], pad_id: int, pack: bool = False,
                       share_prompt: bool = False) -> Batches:
    """One unit per prompt; loss_tokens=1 makes the loop's normaliser the prompt count.

    pack / share_prompt: see collate_preferences (DPO; a reward model reads one row per sequence)."""
    return Batches(lengths=[max(len(x) for x in s.input_ids) for s in samples], loss_tokens=[1] * len(samples),
                   collate=functools.partial(collate_preferences, samples=samples, pad_id=pad_id, pack=pack,
                                             share_prompt=share_prompt))


def kto_batches(samples: list[KTOSample], pad_id: int, pack: bool = False) -> Batches:
    """One unit per sample; loss_tokens=1 makes the loop's normaliser the sample count. A micro-batch of B
    samples holds the samples (input_ids, ...) and their mismatched (KL) sequences (kl_input_ids, ...), in the
    same order: B right-padded rows each, or with `pack` one row each (no padding; position ids restart per
    sequence, so attention keeps them apart: models/forward.packs_rows says when a model can)."""
    return Batches(lengths=[max(len(s.input_ids), len(s.kl_input_ids)) for s in samples],
                   loss_tokens=[1] * len(samples), collate=functools.partial(_collate_kto, samples=samples,
                                                                             pad_id=pad_id, pack=pack))


def _collate_kto(units: list[list[int]], samples: list[KTOSample], pad_id: int, pack: bool = False) -> dict:
    chosen = [samples[i] for unit in units for i in unit]
    rows = [list(range(len(chosen)))] if pack else [[k] for k in range(len(chosen))]
    batch = collate(rows, input_ids=[s.input_ids for s in chosen], weights=[s.weights for s in chosen], pad_id=pad_id)
    kl = collate(rows, input_ids=[s.kl_input_ids for s in chosen], weights=[s.kl_weights for s in chosen],
                 pad_id=pad_id)
    return batch | {f"kl_{k}": v for k, v in kl.items()} | {
        "desirable": torch.tensor([s.desirable for s in chosen], dtype=torch.bool)}  # (B,)
