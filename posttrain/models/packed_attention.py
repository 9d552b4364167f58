"""Attention for packed rows computed sample by sample: no work on pairs a mask would discard.

transformers runs a packed row (position ids restarting at 0 per sample) through SDPA with a
block-diagonal (T x T) mask; on a CPU the kernel still computes every (query, key) block and
repeats the grouped K/V heads. Here each sample gets its own causal SDPA call on its slice (with
grouped-query attention native), so the cost follows sum(L^2) instead of T^2. Same maths: padding
continues the last sample's positions, so it stays in that sample, as under the mask.
With `shared_prefix` (DPO), a run whose positions start at p > 0 also sees the first p tokens of
the run before it that started at 0: the responses of a prompt share one copy of the prompt.
Used only inside training forwards (`packed_attention` switches the model's implementation for
the call, and `recompute_context` for gradient checkpointing's recompute in backward); anything it
does not recognise goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

NAME = "posttrain_packed_sdpa"
_registered = False


class _State:
    """What the current `packed_attention` block asked for, and what the attention calls did."""

    config = None  # the model config an active `packed_attention` block switched (None: no block active)
    shared_prefix = False  # a run starting at position p > 0 attends to the first p tokens of its root run
    per_sample_calls = 0
    cache: tuple[torch.Tensor | None, list] = (None, [])  # (position ids, their runs): one host read per forward


def _runs(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of (B, T) position ids: (length, first position) of each run of consecutive positions
    (transformers' rule for packed sequences: a new sequence wherever the position does not go up by 1)."""
    runs = []
    for row in position_ids.tolist():
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1] + 1]
        runs.append([(b - a, row[a]) for a, b in zip(starts, starts[1:] + [len(row)])])
    return runs


# On a CPU, torch's flash-attention backward in bf16 is slower than in float32 for short samples (2026-12-03,
# AMX Xeon, 9 query / 3 key-value heads of 64, forward + backward: 3.3x at 64 tokens, 2.2x at 128, even at
# 256; bf16 wins from ~384 on): shorter runs attend in float32, then cast back (more exact, too).
CPU_FP32_BELOW = 384


def _sdpa(a, b, c, **kwargs) -> torch.Tensor:
    """SDPA on one run (1, H, n, d); under autocast or with half-precision inputs on a CPU, short runs in float32."""
    if a.device.type == "cpu" and a.shape[-2] < CPU_FP32_BELOW:
        amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        low = amp or (a.dtype if a.dtype in (torch.bfloat16, torch.float16) else None)
        if low is not None:
            with torch.autocast("cpu", enabled=False):
                return F.scaled_dot_product_attention(a.float(), b.float(), c.float(), **kwargs).to(low)
    return F.scaled_dot_product_attention(a, b, c, **kwargs)


def _run_attention(q, k, v, runs, scaling, gqa: bool) -> torch.Tensor:
    """One row: q (Hq, T, d), k/v (Hkv, T, d) -> (Hq, T, d), each run causal within itself (plus its prefix)."""
    lengths = [n for n, _ in runs]
    parts, root = [], None
    for (n, first), a, b, c in zip(runs, q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1)):
        if first == 0 or not _State.shared_prefix:
            root = (b, c)
            parts.append(_sdpa(a[None], b[None], c[None], is_causal=True, scale=scaling, enable_gqa=gqa)[0])
            continue
        if root is None or root[0].shape[1] < first:
            raise ValueError(f"a run starts at position {first} but no earlier run in its row holds that prefix")
        keys, values = torch.cat([root[0][:, :first], b], 1), torch.cat([root[1][:, :first], c], 1)
        mask = torch.ones(n, first + n, dtype=torch.bool, device=q.device).tril(first)  # prefix + causal own part
        parts.append(_sdpa(a[None], keys[None], values[None], attn_mask=mask, scale=scaling, enable_gqa=gqa)[0])
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """query (B, Hq, T, d), key/value (B, Hkv, T, d) -> ((B, T, Hq, d), None), as transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # heavy: transformers, ~3 s

    position_ids = kwargs.get("position_ids")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (position_ids is None or not causal or dropout > 0 or query.shape[2] != key.shape[2] or query.shape[2] < 2
            or position_ids.shape[-1] != query.shape[2] or kwargs.get("position_bias") is not None):
        if _State.shared_prefix:
            raise RuntimeError("rows that share a prompt need per-sample attention; this call cannot use it")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if _State.cache[0] is not position_ids:
        _State.cache = (position_ids, _runs(position_ids.expand(query.shape[0], -1)))
    _State.per_sample_calls += 1
    gqa = query.shape[1] != key.shape[1]
    rows = [_run_attention(q, k, v, runs, scaling, gqa)
            for q, k, v, runs in zip(query.unbind(0), key.unbind(0), value.unbind(0), _State.cache[1])]
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface  # heavy: transformers, ~3 s
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # heavy: transformers, ~3 s

        AttentionInterface.register(NAME, packed_sdpa_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the fallback path gets sdpa's own mask
        _registered = True


@contextmanager
def packed_attention(config, enabled: bool = True, shared_prefix: bool = False):
    """Within the block, a model whose config says `sdpa` attends sample by sample in packed rows.

    shared_prefix: the rows share prompts (a run starting at position p > 0 sees the first p tokens of
    the run before it that started at 0); the block then fails unless every attention call took this path.
    """
    if not enabled or getattr(config, "_attn_implementation", None) != "sdpa":
        if shared_prefix:
            raise RuntimeError("rows that share a prompt need the model's sdpa attention and the fused paths")
        yield
        return
    _register()
    config._attn_implementation = NAME
    _State.config, _State.shared_prefix, _State.per_sample_calls, _State.cache = config, shared_prefix, 0, (None, [])
    try:
        yield
        if shared_prefix and _State.per_sample_calls == 0:
            raise RuntimeError("this model's attention did not take the per-sample path; rows that share a prompt "
                               "need it (model.attn_implementation=eager trains on padded rows instead)")
    finally:
        config._attn_implementation = "sdpa"
        _State.config, _State.shared_prefix, _State.cache = None, False, (None, [])


def recompute_context():
    """`context_fn` for non-reentrant gradient checkpointing: (forward context, recompute context).

    The recompute runs during backward, after the forward's `packed_attention` block has closed; without
    this it would take transformers' SDPA with a block mask (other rounding) and, for rows that share a
    prompt, the wrong attention. The recompute context re-enters the state the forward ran under."""
    snapshot = (_State.config, _State.shared_prefix, _State.cache) if _State.config is not None else None
    return nullcontext(), _reenter(snapshot)


@contextmanager
def _reenter(snapshot):
    if snapshot is None:
        yield
        return
    config, shared_prefix, cache = snapshot
    saved = (config._attn_implementation, _State.config, _State.shared_prefix, _State.cache)
    config._attn_implementation = NAME
    _State.config, _State.shared_prefix, _State.cache = config, shared_prefix, cache
    try:
        yield
    finally:
        config._attn_implementation, _State.config, _State.shared_prefix, _State.cache = saved
