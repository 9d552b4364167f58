"""Attention for packed rows computed sample by sample: no work on pairs a mask would discard.

transformers runs a packed row (position ids restarting at 0 per sample) through SDPA with a
block-diagonal (T x T) mask; on a CPU the kernel still computes every (query, key) block and
repeats the grouped K/V heads. Here each sample gets its own causal SDPA call on its slice (with
grouped-query attention native), so the cost follows sum(L^2) instead of T^2. Same maths: padding
continues the last sample's positions, so it stays in that sample, as under the mask.
Used only inside training forwards (`packed_attention` switches the model's implementation for
the call); anything it does not recognise goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

NAME = "posttrain_packed_sdpa"
_registered = False


def _segment_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row of (B, T) position ids: lengths of the runs of consecutive positions (transformers' rule)."""
    lengths = []
    for row in position_ids.tolist():
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1] + 1]
        lengths.append([b - a for a, b in zip(starts, starts[1:] + [len(row)])])
    return lengths


_cache: tuple[torch.Tensor | None, list[list[int]]] = (None, [])


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """query (B, Hq, T, d), key/value (B, Hkv, T, d) -> ((B, T, Hq, d), None), as transformers' sdpa."""
    global _cache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (position_ids is None or not causal or dropout > 0 or query.shape[2] != key.shape[2] or query.shape[2] < 2
            or position_ids.shape[-1] != query.shape[2] or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if _cache[0] is not position_ids:  # one host read per forward pass, not one per layer
        _cache = (position_ids, _segment_lengths(position_ids.expand(query.shape[0], -1)))
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for q, k, v, lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), _cache[1]):
        parts = [F.scaled_dot_product_attention(a[None], b[None], c[None], is_causal=True, scale=scaling,
                                                enable_gqa=gqa)[0]
                 for a, b, c in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))]
        rows.append(torch.cat(parts, 1) if len(parts) > 1 else parts[0])  # (Hq, T, d)
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(NAME, packed_sdpa_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the fallback path gets sdpa's own mask
        _registered = True


@contextmanager
def packed_attention(config, enabled: bool = True):
    """Within the block, a model whose config says `sdpa` attends sample by sample in packed rows."""
    if not enabled or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    _register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
