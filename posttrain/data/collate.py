"""Batching: which samples go in which row (packing), which rows in which step, and tensors.

A *unit* is one row of a micro-batch: a single sample, or several samples packed together.
The plan of every step is computed from the seed and epoch alone, identically on every
process, so runs resume exactly and N processes see the same effective batches as one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


def pack_first_fit(order: list[int], lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of samples (in `order`) into rows of <= max_length tokens."""
    by_length = sorted(order, key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in by_length:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return bins


def epoch_units(lengths: list[int], *, packing: bool, max_length: int, seed: int, epoch: int) -> list[list[int]]:
    """The rows of one epoch, shuffled by (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not packing:
        return [[i] for i in order]
    bins = pack_first_fit(order, lengths, max_length)
    rng.shuffle(bins)  # FFD sorts by length; shuffling the rows restores a random order of batches
    return bins


@dataclass
class StepPlan:
    micro_batches: list[list[list[int]]]  # this process's micro-batches: each a list of units
    normalizer: float  # supervised tokens in the whole effective batch (all processes)
    n_units: int  # units in the whole effective batch


def plan_epoch(
    units: list[list[int]], loss_tokens: list[int], *, micro: int, accum: int, world: int, rank: int
) -> list[StepPlan]:
    """Split an epoch's units into optimizer steps; micro-batch k of a step goes to rank k % world.

    The last step of an epoch may be smaller; a process may then get no micro-batch at all.
    """
    per_step = micro * accum * world
    plans = []
    for start in range(0, len(units), per_step):
        step_units = units[start:start + per_step]
        micro_batches = [step_units[k:k + micro] for k in range(0, len(step_units), micro)]
        mine = [mb for k, mb in enumerate(micro_batches) if k % world == rank]
        normalizer = float(sum(loss_tokens[i] for unit in step_units for i in unit))
        plans.append(StepPlan(mine, max(normalizer, 1.0), len(step_units)))
    return plans


def collate(units: list[list[int]], input_ids: list[list[int]], weights: list[list[float]], pad_id: int) -> dict:
    """Right-padded tensors for a micro-batch of units.

    Position ids restart at 0 for every packed sample; with no attention mask given, the model
    builds a block-diagonal causal mask from them, so packed samples never attend to each other.
    The first token of every sample gets weight 0: it has no prediction within its own sample.
    """
    rows_ids, rows_w, rows_pos = [], [], []
    for unit in units:
        ids, w, pos = [], [], []
        for i in unit:
            ids += input_ids[i]
            w += [0.0] + list(weights[i][1:])
            pos += list(range(len(input_ids[i])))
        rows_ids.append(ids)
        rows_w.append(w)
        rows_pos.append(pos)
    width = max(len(r) for r in rows_ids)
    batch_ids = torch.full((len(units), width), pad_id, dtype=torch.long)  # (B, T)
    batch_w = torch.zeros((len(units), width), dtype=torch.float32)  # (B, T)
    batch_pos = torch.zeros((len(units), width), dtype=torch.long)  # (B, T)
    real = torch.zeros((len(units), width), dtype=torch.bool)  # (B, T) True on non-pad tokens
    for b, (ids, w, pos) in enumerate(zip(rows_ids, rows_w, rows_pos)):
        n = len(ids)
        batch_ids[b, :n] = torch.tensor(ids)
        batch_w[b, :n] = torch.tensor(w)
        # padding continues the last sample's positions: it sits after every real token, so causal
        # attention keeps it invisible to them
        batch_pos[b, :n] = torch.tensor(pos)
        batch_pos[b, n:] = torch.arange(pos[-1] + 1, pos[-1] + 1 + width - n) if n < width else batch_pos[b, n:]
        real[b, :n] = True
    return {"input_ids": batch_ids, "weights": batch_w, "position_ids": batch_pos, "real_mask": real}
