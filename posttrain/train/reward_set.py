"""What a GRPO policy is rewarded with: one or several reward sources, summed with weights, each reported.

A source is a Python function, a reward model or an HTTP endpoint (train/reward_sources.py, as in PPO), or a
built-in verifiable reward (train/verifiable.py): exact match of the final answer against the
prompt's reference (the data's last assistant turn), or a format regex. A function with a
`references` parameter is also handed each prompt's reference.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.errors import PosttrainError
from posttrain.models.reward_head import RewardModel
from posttrain.train.reward_sources import HttpReward, load_function
from posttrain.train.verifiable import ExactMatch, FormatMatch


@dataclass
class RewardTerm:
    name: str  # reported as reward/<name>
    weight: float
    fn: Callable[..., list[float]]  # (prompts, responses[, references]) -> one float per response
    wants_references: bool


class RewardSet:
    """Weighted reward sources. `score` gives every source's raw value per response, `total` their weighted sum."""

    def __init__(self, terms: list[RewardTerm], accuracy: str | None = None):
        self.terms = terms
        self.names = [t.name for t in terms]
        self.weights = torch.tensor([t.weight for t in terms], dtype=torch.float32)  # (S,)
        self.accuracy = accuracy  # the exact-match source whose mean is reported as accuracy, if any

    @property
    def needs_references(self) -> bool:
        return any(t.wants_references for t in self.terms)

    def score(self, prompts: list[str], responses: list[str], references: list[str | None]) -> torch.Tensor:
        """(B, S) float32: each source's raw reward of each response."""
        columns = []
        for term in self.terms:
            args = (prompts, responses, references) if term.wants_references else (prompts, responses)
            values = [float(v) for v in term.fn(*args)]
            if len(values) != len(responses):
                raise PosttrainError(f"reward {term.name}: {len(values)} scores for {len(responses)} responses")
            if not all(math.isfinite(v) for v in values):
                raise PosttrainError(f"reward {term.name}: a score is not a finite number ({values})")
            columns.append(values)
        return torch.tensor(columns, dtype=torch.float32).t().reshape(len(responses), len(self.terms))

    def total(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B,) the weighted sum the policy maximises."""
        return scores @ self.weights.to(scores.device)


def _term(src, name: str, device, batch_size: int, timeout_s: float) -> RewardTerm:
    """One RewardTerm from a reward section or a reward.sources entry (both have type, function, model, ...)."""
    weight = getattr(src, "weight", 1.0)
    if src.type == "exact_match":
        return RewardTerm(name, weight, ExactMatch(src.answer), True)
    if src.type == "format":
        return RewardTerm(name, weight, FormatMatch(src.pattern), False)
    if src.type == "model":
        return RewardTerm(name, weight, RewardModel(src.model, device, batch_size), False)
    if src.type == "http":
        return RewardTerm(name, weight, HttpReward(src.url, timeout_s), False)
    fn = load_function(src.function)
    try:
        wants = "references" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C function without a readable signature
        wants = False
    return RewardTerm(name, weight, fn, wants)


def build_reward_set(reward_cfg, device: torch.device | str = "cpu") -> RewardSet:
    """reward.sources (weighted), or the one source reward.type names."""
    sources = reward_cfg.sources or [reward_cfg]
    terms = [_term(s, getattr(s, "name", "") or s.type, device, reward_cfg.batch_size, reward_cfg.timeout_s)
             for s in sources]
    accuracy = next((t.name for s, t in zip(sources, terms) if s.type == "exact_match"), None)
    return RewardSet(terms, accuracy)
