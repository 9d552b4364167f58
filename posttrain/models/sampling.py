"""How the next token is chosen in the lean decode loop (`models.decode`), and when a stop string ends a row.

`RowSampler` gives every row its own random stream: a row's sample then does not depend on which other
rows share its batch (or leave it), so N processes sampling shards of a rollout batch draw exactly what
one process drawing all of it does, and a resumed run redraws the same samples. Without row seeds,
sampling is `generate`'s: its own temperature / top-k / top-p warpers and one global torch stream.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from posttrain.models.decode import Picker, greedy


class RowSampler(LogitsProcessor):
    """Temperature + top-p sampling with one torch.Generator per row (one uniform per row and token);
    returns a one-hot score row (0 at the drawn token, -inf elsewhere) so generate's greedy step takes
    exactly that token."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores (B, V)
        chosen = self.draw(scores, list(range(len(scores))))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen[:, None], 0.0)

    def draw(self, scores: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """(b,) one token per batch row, drawn with the generator of the prompt each row belongs to."""
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (b, V)
        if self.top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p (the top token always)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p  # (b, V) mass before this token
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        # One uniform per row from its own stream, then one batched inverse-CDF draw: torch.multinomial would
        # draw a vocabulary's worth of exponentials per row and step (13% of a GRPO rollout's time).
        uniforms = torch.cat([torch.rand(1, generator=self.generators[r], device=probs.device) for r in rows])
        return draw_by_uniforms(probs, uniforms)


def picker(model: nn.Module, *, temperature: float, top_p: float, top_k: int | None,
           row_seeds: list[int] | None, device: torch.device) -> Picker:
    """Greedy; one seeded stream per row (RowSampler); or generate's sampling: its own warpers, one global stream."""
    if temperature <= 0:
        return greedy
    if row_seeds is not None:
        return RowSampler(row_seeds, temperature, top_p, device).draw
    sample = warped_sampler(model, temperature=temperature, top_p=top_p, top_k=top_k)
    return lambda logits, rows: sample(logits)


def warped_sampler(model: nn.Module, *, temperature: float, top_p: float, top_k: int | None = None,
                   generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """generate's sampling: its temperature / top-k / top-p warpers, then one draw per row (b, V) -> (b,)
    from `generator` (None: torch's global stream)."""
    probs_of = warped_probs(model, temperature=temperature, top_p=top_p, top_k=top_k)
    return lambda logits: torch.multinomial(probs_of(logits), 1, generator=generator)[:, 0]


def warped_probs(model: nn.Module, *, temperature: float, top_p: float,
                 top_k: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """(b, V) logits -> (b, V) probabilities after generate's temperature / top-k / top-p warpers."""
    if top_k is None:  # generate's: the model's generation config, else its global default 50
        top_k = getattr(getattr(model, "generation_config", None), "top_k", None) or 50
    warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + \
        ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])

    def probs(logits: torch.Tensor) -> torch.Tensor:
        for warp in warpers:
            logits = warp(None, logits)
        return torch.softmax(logits.float(), dim=-1)
    return probs


def draw_by_uniforms(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(b, V) probabilities, (b,) uniforms in [0, 1) -> (b,) tokens by the inverse CDF: one batched draw whose
    rows can each come from a different random stream (only the uniforms do)."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1])[:, None], right=True)[:, 0].clamp(
        max=probs.shape[-1] - 1)


def stop_hit(tokenizer, stop_strings: list[str] | None) -> Callable[[list[int]], bool] | None:
    """ids -> whether their text now holds a stop string; decodes a tail long enough to hold the longest one
    (a character is at most 4 byte tokens)."""
    stop_strings = [s for s in stop_strings or [] if s]
    if not stop_strings:
        return None
    window = 4 * max(map(len, stop_strings)) + 2
    return lambda ids: any(s in tokenizer.decode(ids[-window:]) for s in stop_strings)
