"""Prefill on a CPU as one packed row: the prompts' common prefix once, then each prompt's own tokens, no padding.

Why: prefill is compute-bound on a CPU (models/prefill.py), so a padded token costs as much as a real one, and
every forward call has a fixed cost. Padding to the longest prompt, or splitting by length (`prefill_groups`),
still runs tokens nobody needs, in one call per length group plus one for the shared prefix. Here the prefix
comes first (positions 0..n-1), then every prompt's own tokens (positions n..), in one forward through
models/packed_attention.py with `shared_prefix`: each prompt attends to the prefix and causally to itself,
which is what its padded row computes. Its keys and values are then gathered into the left-padded rows that
models/decode.RaggedBatch keeps. SmolLM2 on the generation benchmark's 8 chat prompts (24 shared tokens, then
14-39 of their own): 0.145 s against 0.207 s for the prefix call plus two length groups (2-core AMD EPYC, fp32).
A GPU keeps the padded calls: padding costs nearly nothing there, and this attends prompt by prompt in Python.
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.models.kv_cache import growing_cache
from posttrain.models.packed_attention import packed_attention
from posttrain.models.prefill import common_prefix

# Model types whose attention takes position ids through models/packed_attention.py, checked against padded
# prefill in tests/models/test_flat_prefill.py; any other keeps the padded calls.
FAMILIES = {"llama", "qwen2", "qwen3", "mistral"}


def flat_prefill_ok(model: nn.Module, prompts: list) -> bool:
    """Whether these prompts (two or more) can be prefilled as one packed row: a CPU model of FAMILIES on
    transformers' sdpa attention, and no sliding window shorter than the longest prompt."""
    config = getattr(model, "config", None)  # the model's own: a composite (vision-language) model is not taken
    window = getattr(config, "sliding_window", None)
    return (len(prompts) > 1 and getattr(config, "model_type", None) in FAMILIES
            and getattr(config, "_attn_implementation", None) == "sdpa"
            and next(model.parameters()).device.type == "cpu"
            and (window is None or max(map(len, prompts)) <= window))


def flat_prefill(model: nn.Module, prompts: list[tuple[int, ...]], logits_to_keep: bool):
    """Prefill `prompts` in one forward. Returns (logits (n, V) float of each prompt's last token, per-layer
    (keys, values) of left-padded rows (n, H, W, d), mask (n, W) long, positions (n,) of each last token,
    the shared prefix's length and views of its per-layer (keys, values) of one row (1, H, prefix, d))."""
    device = next(model.parameters()).device
    n = common_prefix(prompts, min(map(len, prompts)) - 1)  # every prompt keeps its last token (its logits)
    ids, positions, starts = list(prompts[0][:n]), list(range(n)), []
    for p in prompts:
        starts.append(len(ids))
        ids += p[n:]
        positions += range(n, len(p))
    last = torch.tensor([start + len(p) - n - 1 for start, p in zip(starts, prompts)], device=device)
    cache = growing_cache(model.config)
    keep = {"logits_to_keep": last} if logits_to_keep else {}
    with packed_attention(model.config, shared_prefix=True):
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=True, past_key_values=cache,
                       position_ids=torch.tensor([positions], device=device), **keep).logits[0]
    logits = (logits if keep else logits[last]).float()
    width = max(map(len, prompts))
    index = torch.tensor([[0] * (width - len(p)) + list(range(n)) + list(range(start, start + len(p) - n))
                          for start, p in zip(starts, prompts)], device=device)  # (n, W): padding reads column 0
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    rows = [(layer.keys[0][:, index].transpose(0, 1), layer.values[0][:, index].transpose(0, 1))
            for layer in cache.layers]  # (H, n, W, d) -> (n, H, W, d)
    prefix = [(layer.keys[:, :, :n], layer.values[:, :, :n]) for layer in cache.layers]  # views: clone to keep
    return logits, rows, mask, torch.tensor([len(p) - 1 for p in prompts], device=device), n, prefix
