"""The stage sections of a training run: `rm` (reward model), `dpo` (the DPO family), `ppo` and its
`reward` source. A run config may hold only its own stage's sections.

Every default lives here once, beside its one-line doc (`posttrain keys` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.data.config import DatasetConfig
from posttrain.typed_config import opt

# The sections each stage reads, besides the sections every run has.
STAGE_SECTIONS = {"sft": (), "rm": ("rm",), "dpo": ("dpo",), "ppo": ("ppo", "reward")}


@dataclass
class RewardModelConfig:
    center_coef: float = opt(0.0, "reward centering: adds coef x mean((r_chosen + r_rejected)^2) to the loss")
    normalize_data: str = opt(
        "", "after training, store reward_offset so this file's reference responses (chosen / top-ranked, "
        "or conversations' last reply) score 0 on average (InstructGPT's bias step); '' = off")


@dataclass
class DPOConfig:
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = opt(
        "sigmoid", "preference loss: sigmoid (DPO), ipo, hinge, robust, simpo, orpo")
    beta: float = opt(0.1, "DPO/hinge/robust beta, IPO tau, SimPO beta (paper: 2.0), ORPO lambda")
    label_smoothing: float = opt(0.0, "assumed label-flip rate: conservative DPO (sigmoid) or robust")
    gamma: float = opt(0.5, "SimPO target reward margin")
    sft_weight: float = opt(0.0, "adds this x mean token NLL of the chosen response")
    reference: Literal["auto", "adapter", "copy", "precompute"] = opt(
        "auto", "reference model: LoRA base with adapters off, a frozen copy, or log-probs precomputed once; "
        "auto = adapter with LoRA, else precompute")
    reference_cache: bool = opt(
        True, "precompute: keep the reference log-probs in $POSTTRAIN_CACHE/ref_logps, keyed by the tokenized "
        "data, the model and its settings; a later run with the same key loads them")


@dataclass
class RewardConfig:
    type: Literal["function", "model", "http"] = opt(
        "function", "reward source: a Python function, a reward-model folder, or an HTTP endpoint")
    function: str = opt("", "module:function or file.py:function; called with (prompts, responses) -> floats")
    model: str = opt("", "reward-model folder (sequence classification, num_labels=1, or a PEFT adapter on one)")
    url: str = opt("", "HTTP endpoint: POST {prompts, responses} -> {rewards}")
    timeout_s: float = opt(60.0, "HTTP timeout per request")
    batch_size: int = opt(8, "reward-model scoring batch")
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of responses that never end")
    normalize: bool = opt(False, "divide scores by running std after subtracting the running mean")
    clip: float | None = opt(None, "clip (shaped) scores to [-clip, clip]")


@dataclass
class PPOConfig:
    rollout_batch_size: int = opt(8, "prompts sampled per PPO step (one rollout batch)")
    mini_batch_size: int = opt(4, "rollouts per optimizer step inside a PPO epoch")
    ppo_epochs: int = opt(2, "passes over each rollout batch")
    max_new_tokens: int = opt(32, "response length limit")
    temperature: float = opt(1.0, "sampling temperature (log-probs use the same temperature)")
    top_p: float = opt(1.0, "nucleus sampling mass")
    stop_strings: list[str] = opt([], "extra strings that end a response (eos and end-of-turn always do)")
    kl_estimator: Literal["k1", "k3"] = opt("k1", "per-token KL to the reference: k1 = log-ratio, k3 = Schulman's")
    kl_coef: float = opt(0.05, "beta: weight of the per-token KL penalty (start value when adaptive)")
    kl_control: Literal["fixed", "adaptive"] = opt("fixed", "adaptive = Ziegler et al. controller toward kl_target")
    kl_target: float = opt(6.0, "adaptive: target KL per response (nats)")
    kl_horizon: int = opt(10000, "adaptive: horizon in rollouts")
    gamma: float = opt(1.0, "GAE discount")
    lam: float = opt(0.95, "GAE lambda")
    clip_range: float = opt(0.2, "policy ratio clip epsilon")
    value_clip: float = opt(0.2, "value clip around the rollout values")
    vf_coef: float = opt(0.1, "value loss weight")
    entropy_coef: float = opt(0.0, "entropy bonus weight (0 = off)")
    whiten_advantages: bool = opt(True, "normalise advantages to mean 0, std 1 per rollout batch")
    value_model: Literal["shared", "separate"] = opt(
        "shared", "value head on the policy backbone, or on a separate copy of the base with its own LoRA")
    ptx_coef: float = opt(0.0, "gamma of PPO-ptx: weight of the LM loss on ptx_datasets (0 = off)")
    ptx_datasets: list[DatasetConfig] = opt([], "SFT/pre-training files for the ptx term and its held-out loss")
    ptx_batch_size: int = opt(4, "ptx samples per optimizer step")
    ptx_val_size: float = opt(0.0, "share (<1) or count of ptx rows held out to report LM loss")
    sample_every: int = opt(5, "write a sample generation to logs/samples.jsonl every N steps (0 = never)")
