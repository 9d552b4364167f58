"""The stage sections of a training run: `rm` (reward model), `dpo` (the DPO family), `kto`, `ppo` and
`grpo` and their `reward` sources. A run config may hold only its own stage's sections.

Every default lives here once, beside its one-line doc (`posttrain keys` lists them), and each section's
rules beside the section (`validate_*`, called by train/config.py's `validate`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from posttrain.data.config import DatasetConfig
from posttrain.errors import ConfigError
from posttrain.models.config import Methods
from posttrain.typed_config import opt

# The sections each stage reads, besides the sections every run has.
STAGE_SECTIONS = {"sft": ("vision",), "rm": ("rm",), "dpo": ("dpo",), "ppo": ("ppo", "reward"),
                  "grpo": ("grpo", "reward"), "kto": ("kto",)}


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


def validate_dpo(d: DPOConfig, methods: Methods) -> None:
    if d.beta <= 0 or not 0 <= d.label_smoothing < 0.5:
        raise ConfigError("dpo.beta must be > 0 and dpo.label_smoothing in [0, 0.5)")
    if d.reference == "adapter" and not methods.adapter_off_is_base():
        pissa = " with lora.init=pissa" if methods.lora.init == "pissa" else ""
        raise ConfigError(f"dpo.reference=adapter needs an adapter whose removal gives the base model (lora, qlora, "
                          f"prompt, prefix; not PiSSA), not method.type={methods.type}{pissa}; "
                          "use dpo.reference=copy or precompute")


# ---------------------------------------------------------------- reward sources (stages ppo and grpo)

REWARD_TYPES = Literal["function", "model", "http", "exact_match", "format"]
_ANSWER_DOC = ("exact_match: the final answer is after the last '####' (hash), in the last \\boxed{} (boxed), or "
               "whichever comes last (auto); a reference without either marker is the answer itself")
_PATTERN_DOC = "format: regex the whole reply (stripped) must match for reward 1 (. matches newlines)"


@dataclass
class RewardSourceConfig:
    type: REWARD_TYPES = opt(
        "exact_match", "function, model, http (as reward.type), exact_match (1 if the reply's final answer equals the "
        "prompt's reference, the data's last assistant turn) or format (1 if the reply matches a regex)")
    weight: float = opt(1.0, "weight of this source in the summed reward")
    name: str = opt("", "name in the metrics (reward/<name>); default: the type")
    function: str = opt("", "function: module:function or file.py:function -> floats")
    model: str = opt("", "model: reward-model folder")
    url: str = opt("", "http: endpoint")
    answer: Literal["auto", "hash", "boxed"] = opt("auto", _ANSWER_DOC)
    pattern: str = opt("", _PATTERN_DOC)


@dataclass
class RewardConfig:
    type: REWARD_TYPES = opt(
        "function", "reward source: a Python function, a reward-model folder, an HTTP endpoint; stage grpo also: "
        "exact_match (final answer vs the prompt's reference) or format (regex)")
    function: str = opt("", "module:function or file.py:function; called with (prompts, responses) -> floats "
                            "(stage grpo: also references=..., if the function takes that keyword)")
    model: str = opt("", "reward-model folder (sequence classification, num_labels=1, or a PEFT adapter on one)")
    url: str = opt("", "HTTP endpoint: POST {prompts, responses} -> {rewards}")
    answer: Literal["auto", "hash", "boxed"] = opt("auto", _ANSWER_DOC)
    pattern: str = opt("", _PATTERN_DOC)
    sources: list[RewardSourceConfig] = opt(
        [], "stage grpo: several sources, rewarded with their weighted sum (each reported as reward/<name>); "
            "when given, reward.type / function / model / url are not used")
    timeout_s: float = opt(60.0, "HTTP timeout per request")
    batch_size: int = opt(8, "reward-model scoring batch")
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of responses that never end")
    normalize: bool = opt(False, "divide scores by running std after subtracting the running mean")
    clip: float | None = opt(None, "clip (shaped) scores to [-clip, clip]")


def validate_reward_source(src: RewardConfig | RewardSourceConfig, key: str) -> None:
    """The field a source's type needs is set; a format pattern compiles."""
    field = {"function": "function", "model": "model", "http": "url", "format": "pattern"}.get(src.type)
    if field is not None and not getattr(src, field):
        raise ConfigError(f"{key}.type={src.type} needs {key}.{field}")
    if src.type == "format":
        try:
            re.compile(src.pattern)
        except re.error as err:
            raise ConfigError(f"{key}.pattern {src.pattern!r} is not a valid regex: {err}") from None


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


def validate_ppo(p: PPOConfig, r: RewardConfig, max_steps: int, method_type: str) -> None:
    if max_steps <= 0:
        raise ConfigError("stage ppo: set train.max_steps (the number of rollout batches)")
    if p.mini_batch_size < 1 or p.rollout_batch_size % p.mini_batch_size:
        raise ConfigError("ppo.rollout_batch_size must be a multiple of ppo.mini_batch_size (>= 1)")
    if p.ppo_epochs < 1 or p.max_new_tokens < 1 or p.temperature <= 0:
        raise ConfigError("ppo.ppo_epochs and ppo.max_new_tokens must be >= 1, ppo.temperature > 0")
    if p.ptx_coef > 0 and not p.ptx_datasets:
        raise ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_datasets (the LM-loss data)")
    if p.kl_control == "adaptive" and (p.kl_target <= 0 or p.kl_horizon < 1):
        raise ConfigError("ppo.kl_target must be > 0 and ppo.kl_horizon >= 1 for adaptive KL")
    if r.sources or r.type in ("exact_match", "format"):
        raise ConfigError("reward.sources and reward.type exact_match / format are read by stage grpo; stage ppo "
                          "takes one function, model or http source")
    validate_reward_source(r, "reward")
    if p.value_model == "separate" and method_type != "lora":
        raise ConfigError("ppo.value_model=separate is only supported with method.type=lora")


# ---------------------------------------------------------------- stage grpo

@dataclass
class GRPOConfig:
    estimator: Literal["grpo", "rloo", "dr_grpo"] = opt(
        "grpo", "advantage: grpo (group mean / std), rloo (leave-one-out mean of the others), dr_grpo (group mean, "
        "no std, and the length-unbiased constant loss normaliser)")
    group_size: int = opt(8, "G: responses sampled per prompt (the group its advantages are relative to)")
    prompts_per_step: int = opt(4, "prompts per step; a step samples prompts_per_step x group_size responses")
    mini_batch_size: int = opt(0, "responses per optimizer update; 0 = all of a step's responses in one update")
    epochs: int = opt(1, "mu: passes over each step's responses (1 with one update: on-policy, the ratio is 1)")
    max_new_tokens: int = opt(64, "response length limit (also the dr_grpo normaliser)")
    temperature: float = opt(1.0, "sampling temperature (log-probs use the same temperature)")
    top_p: float = opt(1.0, "nucleus sampling mass")
    stop_strings: list[str] = opt([], "extra strings that end a response (eos and end-of-turn always do)")
    clip_range: float = opt(0.2, "epsilon: the ratio pi / pi_old is clipped to [1 - eps, 1 + eps]")
    kl_coef: float = opt(0.0, "beta: weight of the per-token k3 KL to the reference; 0 = no reference model and no "
                              "reference forward pass")
    loss_norm: Literal["auto", "sequence", "token", "constant"] = opt(
        "auto", "loss normaliser: sequence (mean over each response's tokens, then over responses), token (over all "
        "tokens of the update), constant (max_new_tokens per response); auto = constant for dr_grpo, else sequence")
    sample_every: int = opt(5, "write one sampled group to logs/samples.jsonl every N steps (0 = never)")


def validate_grpo(g: GRPOConfig, r: RewardConfig, max_steps: int) -> None:
    """Cross-field rules of stage grpo and its reward sources."""
    if max_steps <= 0:
        raise ConfigError("stage grpo: set train.max_steps (the number of sampled batches)")
    if g.group_size < 2 or g.prompts_per_step < 1 or g.epochs < 1 or g.max_new_tokens < 1:
        raise ConfigError("grpo.group_size must be >= 2; grpo.prompts_per_step, epochs and max_new_tokens >= 1")
    batch = g.prompts_per_step * g.group_size
    if g.mini_batch_size < 0 or batch % (g.mini_batch_size or batch):
        raise ConfigError(f"grpo.mini_batch_size ({g.mini_batch_size}) must divide the step's {batch} responses "
                          "(prompts_per_step x group_size), or be 0 for all of them")
    if g.temperature <= 0 or not 0 < g.top_p <= 1 or g.clip_range <= 0 or g.kl_coef < 0:
        raise ConfigError("grpo.temperature and grpo.clip_range must be > 0, grpo.top_p in (0, 1], grpo.kl_coef >= 0")
    if r.normalize:
        raise ConfigError("reward.normalize does not apply to stage grpo: advantages are already relative to "
                          "each prompt's group")
    for i, src in enumerate(r.sources):
        validate_reward_source(src, f"reward.sources[{i}]")
    if not r.sources:
        validate_reward_source(r, "reward")
    names = [s.name or s.type for s in r.sources]
    if len(set(names)) < len(names):
        raise ConfigError(f"reward.sources: names must differ (got {names}); set name: on repeated types")


# ---------------------------------------------------------------- stage kto

@dataclass
class KTOConfig:
    beta: float = opt(0.1, "beta: scale of the implicit reward log pi/pi_ref inside the value function's sigmoid")
    desirable_weight: float = opt(1.0, "lambda_D: weight of desirable (label true) responses")
    undesirable_weight: float = opt(
        1.0, "lambda_U: weight of undesirable (label false) responses; the paper keeps lambda_D n_D / (lambda_U n_U) "
        "in [1, 4/3]")


def validate_kto(k: KTOConfig) -> None:
    if k.beta <= 0 or k.desirable_weight <= 0 or k.undesirable_weight <= 0:
        raise ConfigError("kto.beta, kto.desirable_weight and kto.undesirable_weight must be > 0")
