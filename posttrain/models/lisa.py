"""LISA: layerwise importance sampling (Pan et al. 2024, "LISA: Layerwise Importance Sampling for
Memory-Efficient Large Language Model Fine-Tuning", Algorithm 1).

Embeddings, the LM head and the final norm always train. Every K optimizer steps a fresh random
set of gamma decoder blocks is unfrozen and all others are frozen. The optimizer owns every
parameter that may ever train, but frozen ones get no gradient (AdamW skips `grad is None`) and
their Adam moments are dropped when they freeze, so optimizer memory stays that of the active set.
"""

from __future__ import annotations

import random
import re

import torch
from torch import nn

from posttrain.models.anatomy import find_layers, unwrap


def _layer_index(model: nn.Module) -> dict[str, int]:
    """Parameter name -> decoder block index, for the parameters inside decoder blocks."""
    prefix, _ = find_layers(model)
    layer_re = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    out = {}
    for name, _ in unwrap(model).named_parameters():
        match = layer_re.match(name)
        if match:
            out[name] = int(match.group(1))
    return out


def apply_lisa(model: nn.Module) -> nn.Module:
    """Freeze every decoder block; everything outside them (embeddings, head, final norm) trains."""
    in_layers = _layer_index(model)
    for name, param in unwrap(model).named_parameters():
        param.requires_grad_(name not in in_layers)
    return model


def lisa_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter LISA may train: the always-on ones plus all decoder blocks (the optimizer's set)."""
    return list(unwrap(model).parameters())


class LisaSchedule:
    """The Loop's per-step hook: `schedule(step, optimizer)` switches the active blocks every K steps.

    The draw for interval k is a pure function of (seed, k), so a resumed run picks the same blocks.
    """

    def __init__(self, model: nn.Module, lisa_cfg, seed: int):
        _, layers = find_layers(model)
        self.n_layers = len(layers)
        self.gamma = min(lisa_cfg.layers, self.n_layers)
        self.interval = lisa_cfg.interval
        self.seed = seed
        self.active: list[int] | None = None
        self.by_layer: list[list[nn.Parameter]] = [[] for _ in range(self.n_layers)]
        params = dict(unwrap(model).named_parameters())
        for name, index in _layer_index(model).items():
            self.by_layer[index].append(params[name])

    def draw(self, step: int) -> list[int]:
        """The blocks active at optimizer step `step` (0-based), sorted."""
        rng = random.Random(self.seed * 1_000_003 + step // self.interval)
        return sorted(rng.sample(range(self.n_layers), self.gamma))

    def __call__(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        active = self.draw(step)
        if active == self.active:
            return
        for index, params in enumerate(self.by_layer):
            on = index in active
            for param in params:
                param.requires_grad_(on)
                if not on:
                    param.grad = None
                    optimizer.state.pop(param, None)  # frees the Adam moments of a frozen block
        self.active = active

    def trainable_per_step(self, model: nn.Module) -> int:
        """Parameters that get gradients in one step: the always-on set plus gamma blocks."""
        in_layers = {id(p) for params in self.by_layer for p in params}
        always = sum(p.numel() for p in unwrap(model).parameters() if id(p) not in in_layers)
        block = max(sum(p.numel() for p in params) for params in self.by_layer)
        return always + self.gamma * block
