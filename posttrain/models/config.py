"""The model's config sections: which model (`model`), what trains (`method`) and each method's settings
(`lora`, `freeze`, `quant`, `lisa`, `prompt`), bundled as `Methods` for models/methods.py.

Every default lives here once, beside its one-line doc (`posttrain keys` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posttrain.typed_config import opt

# Methods that add virtual tokens (PEFT prompt / prefix tuning) instead of changing weights.
PROMPT_METHODS = ("prompt", "prefix")
# The sections each method.type reads (a run's saved config keeps only its method's).
METHOD_SECTIONS = {"lora": ("lora",), "qlora": ("lora", "quant"), "full": (), "freeze": ("freeze",),
                   "lisa": ("lisa",), "prompt": ("prompt",), "prefix": ("prompt",)}

# Default peak lr per method.type (SFT-scale; preference stages usually want lower, set optim.lr):
# virtual tokens need ~100x LoRA's lr (Lester et al. 2021 used 0.3), full fine-tuning ~10x less.
METHOD_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "freeze": 1e-4, "lisa": 5e-5, "prompt": 3e-2, "prefix": 1e-2}


@dataclass
class ModelConfig:
    name_or_path: str = opt(
        "", "required to train: HF model folder, hub id, or built-in: smollm2-135m-instruct, tiny-random")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "weights/compute dtype; auto = float32 on CPU (no fast bf16 there), bfloat16 on CUDA")
    attn_implementation: str = opt("sdpa", "attention kernel: sdpa, eager, flash_attention_2")
    revision: str = opt("main", "hub revision (branch, tag or commit) for hub ids")
    trust_remote_code: bool = opt(False, "allow custom modelling code from the hub")


@dataclass
class LoraConfig:
    r: int = opt(8, "LoRA rank")
    alpha: float = opt(16.0, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = opt(0.0, "dropout on the LoRA input")
    target_modules: list[str] = opt(["all-linear"], "module names to adapt; all-linear = every linear but the head")
    use_dora: bool = opt(False, "DoRA (Liu et al. 2024): split each adapted weight into magnitude and direction")
    use_rslora: bool = opt(False, "rsLoRA (Kalajdzievski 2023): scale = alpha / sqrt(r), stable at high ranks")
    init: Literal["default", "gaussian", "pissa"] = opt(
        "default", "adapter init: default (B=0), gaussian, or pissa (A, B from the top-r SVD of each weight; "
        "saved converted to a plain rank-2r LoRA so the original base loads it)")
    lr_ratio: float = opt(1.0, "LoRA+ (Hayou et al. 2024): lr of the B matrices = optim.lr * this (paper: 16)")
    modules_to_save: list[str] = opt(
        [], "modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head] after adding tokens")


@dataclass
class FreezeConfig:
    trainable_layers: int = opt(2, "train only the last N transformer blocks (0 = none)")
    trainable_modules: list[str] = opt([], "also train parameters whose name contains one of these, e.g. norm")


@dataclass
class QuantConfig:
    quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type of the frozen base (QLoRA uses NF4)")
    double_quant: bool = opt(True, "also quantise the per-block scales (saves ~0.4 bit per weight)")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype the 4-bit weights are de-quantised to for matmuls; auto = float32 on CPU, bf16 on CUDA")


@dataclass
class LisaConfig:
    layers: int = opt(2, "gamma: decoder blocks trained at a time (embeddings, head and final norm always train)")
    interval: int = opt(20, "K: optimizer steps between fresh random draws of the trained blocks")


@dataclass
class PromptConfig:
    num_virtual_tokens: int = opt(20, "virtual tokens before every input (prompt) or in every layer's KV (prefix)")
    init_text: str = opt("", "prompt tuning: initialise the virtual tokens from this text's embeddings; '' = random")
    prefix_projection: bool = opt(False, "prefix tuning: reparameterise the prefix through a 2-layer MLP")


@dataclass
class MethodConfig:
    type: Literal["lora", "qlora", "full", "freeze", "lisa", "prompt", "prefix"] = opt(
        "lora", "what trains: lora (+ DoRA/rsLoRA/PiSSA/LoRA+ via lora.*), qlora (LoRA on a 4-bit NF4 base), "
        "full, freeze (last blocks), lisa (random blocks every K steps), prompt / prefix tuning (virtual tokens); "
        "every method works on every training stage (sft, rm, dpo, ppo)")


@dataclass
class Methods:
    """The method sections of a run, bundled: what models/methods.py reads (method.type picks which apply)."""

    method: MethodConfig = field(default_factory=MethodConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lisa: LisaConfig = field(default_factory=LisaConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    @classmethod
    def of(cls, config) -> Methods:
        """The bundle of a config holding these sections at its top level (a run config, a saved run)."""
        return cls(config.method, config.lora, config.freeze, config.quant, config.lisa, config.prompt)

    @property
    def type(self) -> str:
        return self.method.type

    def adapter_off_is_base(self) -> bool:
        """True when the model with its adapter disabled is the loaded base model, the DPO / PPO reference (as
        a copy or precomputed log-probs would be): LoRA-family and virtual-token adapters, but not PiSSA, whose
        initialisation rewrites the base weights."""
        return self.type in PROMPT_METHODS or (self.type in ("lora", "qlora") and self.lora.init != "pissa")
