"""What the PPO policy is rewarded with: reward sources, reward shaping, and KL-coefficient control.

A reward source is a callable `(prompts, responses) -> list[float]`: a Python function named
`module:function` (or `file.py:function`), a trained reward model (a transformers
sequence-classification folder with one label, optionally a PEFT adapter; its stored
`reward_offset` is subtracted), or an HTTP endpoint.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

from posttrain.errors import ConfigError, PosttrainError
from posttrain.models.reward_head import RewardModel

RewardFn = Callable[[list[str], list[str]], list[float]]


def build_reward_source(reward_cfg, device: torch.device | str = "cpu") -> RewardFn:
    """The reward callable for a RewardConfig (type: function, model or http)."""
    if reward_cfg.type == "function":
        return load_function(reward_cfg.function)
    if reward_cfg.type == "model":
        return RewardModel(reward_cfg.model, device, reward_cfg.batch_size)
    if reward_cfg.type == "http":
        return HttpReward(reward_cfg.url, reward_cfg.timeout_s)
    raise ConfigError(f"reward.type {reward_cfg.type!r} is not one of function, model, http")


def load_function(ref: str) -> RewardFn:
    """`pkg.module:fn` (imported) or `path/to/file.py:fn` (loaded from the file)."""
    module_ref, sep, name = ref.rpartition(":")
    if not sep or not module_ref or not name:
        raise ConfigError(f"reward.function {ref!r}: expected module:function or file.py:function")
    try:
        if module_ref.endswith(".py"):
            path = Path(module_ref)
            if not path.is_file():
                raise ConfigError(f"reward.function: file not found: {path}")
            spec = importlib.util.spec_from_file_location(f"posttrain_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_ref)
    except ImportError as err:
        raise ConfigError(f"reward.function {ref!r}: cannot import {module_ref}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward.function {ref!r}: {module_ref} has no function {name!r}")
    return fn


class HttpReward:
    """POST {"prompts": [...], "responses": [...]} as JSON; expects {"rewards": [float, ...]} back."""

    def __init__(self, url: str, timeout_s: float = 60.0):
        self.url, self.timeout_s = url, timeout_s

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        body = json.dumps({"prompts": prompts, "responses": responses}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                rewards = json.loads(reply.read())["rewards"]
        except (OSError, ValueError, KeyError) as err:
            raise PosttrainError(f"reward.url {self.url}: {type(err).__name__}: {err}") from None
        return [float(r) for r in rewards]


class RunningMoments:
    """Running mean / std of rewards (parallel-variance merge), for reward normalisation."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 0.0):
        self.mean, self.var, self.count = mean, var, count

    def update(self, x: torch.Tensor) -> None:
        n = float(x.numel())
        batch_mean, batch_var = float(x.mean()), float(x.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    def state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, reward_cfg, moments: RunningMoments) -> torch.Tensor:
    """Raw scores (B,) -> the scores PPO optimises: no-EOS penalty, then normalise, then clip."""
    if reward_cfg.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - reward_cfg.missing_eos_penalty)
    if reward_cfg.normalize:
        moments.update(scores)
        scores = (scores - moments.mean) / math.sqrt(moments.var + 1e-8)
    if reward_cfg.clip is not None:
        scores = scores.clamp(-reward_cfg.clip, reward_cfg.clip)
    return scores


class FixedKL:
    """A constant KL coefficient beta."""

    def __init__(self, coef: float):
        self.coef = coef

    def update(self, observed_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKL:
    """Ziegler et al. 2019 (sec. 2.2): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, observed_kl: float, n_steps: int) -> None:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon
