"""Preference samples -> one training micro-batch (torch tensors), for the reward-model and DPO stages.

Every response of every prompt is one sequence and pairs index those sequences; packed, the responses of
a prompt may share one copy of its prompt tokens (models/packed_attention.py reads the layout).
"""

from __future__ import annotations

import torch

from posttrain.data.collate import collate
from posttrain.data.preference import PrefSample
from posttrain.errors import PosttrainError


def shared_prefix(sample: PrefSample) -> int:
    """Tokens every response of a prompt starts with and none is trained on (the rendered prompt), or 0."""
    ids = sample.input_ids
    n = min(len(x) for x in ids) - 1  # each response keeps at least one token of its own
    first_loss = min(next((t for t, w in enumerate(ws) if w != 0), len(ws)) for ws in sample.weights)
    p = 0
    while p < min(n, first_loss) and all(x[p] == ids[0][p] for x in ids):
        p += 1
    return p


def pack_sequences(flat: list[tuple[list[int], list[float], int, int]]) -> tuple[dict, list[tuple[int, int, int]]]:
    """Sequences (ids, weights, shared prefix p, prompt) -> one packed row. The first sequence of a prompt
    carries the p prefix tokens; the others continue at position p after their own predecessor, which
    is how packed_attention recognises that they attend to that prefix."""
    ids, pos, w, where = [], [], [], []  # where[r] = (column of r's own tokens, p, column of r's prefix)
    prompt = prefix_col = None
    for seq_ids, seq_w, p, g in flat:
        if g != prompt:
            prompt, prefix_col = g, len(ids)
            ids += seq_ids[:p]
            pos += list(range(p))
            w += seq_w[:p]
        where.append((len(ids), p, prefix_col))
        ids += seq_ids[p:]
        pos += list(range(p, len(seq_ids)))
        w += seq_w[p:]
    batch = {"input_ids": torch.tensor([ids]), "weights": torch.tensor([w], dtype=torch.float32),  # (1, T)
             "position_ids": torch.tensor([pos]), "real_mask": torch.ones((1, len(ids)), dtype=torch.bool)}
    return batch, where


def collate_preferences(units: list[list[int]], samples: list[PrefSample], pad_id: int, pack: bool = False,
                        share_prompt: bool = False) -> dict:
    """Every response of every prompt in the micro-batch is one sequence; pairs index those sequences.

    pack=False: one right-padded row per sequence (what a sequence-classification reward model reads).
    pack=True: all sequences in one row (no padding), position ids restarting per sequence; with
    share_prompt the responses of a prompt share one copy of its prompt tokens (needs per-sample
    attention, models/packed_attention.py). target_* (N,) name every supervised token: the row and
    column of the position that predicts it, its id, weight and sequence.
    pair_weight = 1 / (pairs of the prompt), so a K-response prompt counts once whatever K is.
    """
    flat, better, worse, margin, weight, ref = [], [], [], [], [], []
    for unit in units:
        for i in unit:
            s, base = samples[i], len(flat)
            p = shared_prefix(s) if pack and share_prompt else 0
            flat += [(ids, ws, p, i) for ids, ws in zip(s.input_ids, s.weights)]
            for k, (b, w) in enumerate(s.pairs):
                better.append(base + b)
                worse.append(base + w)
                margin.append(s.margin if s.pair_margins is None else s.pair_margins[k])
                weight.append(1.0 / len(s.pairs))
            ref += s.ref_logps or []
    if pack:
        batch, where = pack_sequences(flat)
    else:
        batch = collate([[k] for k in range(len(flat))], input_ids=[f[0] for f in flat],
                        weights=[f[1] for f in flat], pad_id=pad_id)
        where = [(0, 0, 0)] * len(flat)
    targets = []  # (row, column of the predicting position, target id, weight, sequence)
    for r, ((ids, ws, *_), (col, p, prefix_col)) in enumerate(zip(flat, where)):
        row = 0 if pack else r
        for t in range(1, len(ids)):
            if ws[t] != 0:
                targets.append((row, prefix_col + t - 1 if t - 1 < p else col + t - 1 - p, ids[t], ws[t], r))
    rows, cols, tgt, tw, seq = zip(*targets) if targets else ((),) * 5
    batch.update(target_row=torch.tensor(rows, dtype=torch.long), target_pos=torch.tensor(cols, dtype=torch.long),
                 target_ids=torch.tensor(tgt, dtype=torch.long), target_weight=torch.tensor(tw),
                 target_seq=torch.tensor(seq, dtype=torch.long), n_samples=torch.tensor(len(flat)),
                 seq_lengths=torch.tensor([len(f[0]) for f in flat]),  # (R,) as rendered, shared prompt included
                 shared_prompt=torch.tensor(any(f[2] for f in flat)),  # some responses continue a shared prompt
                 pair_better=torch.tensor(better), pair_worse=torch.tensor(worse),  # (P,) sequence indices
                 pair_margin=torch.tensor(margin), pair_weight=torch.tensor(weight))  # (P,)
    if ref:
        if len(ref) != len(flat):
            raise PosttrainError("reference log-probs were precomputed for only some samples")
        batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)  # (R,)
    return batch
