"""Run config: YAML + dotted `key=value` overrides -> a typed, validated, nested dataclass.

Every default lives here once, beside a one-line doc (`opt(default, doc)`); the docs feed
`posttrain keys`. Unknown keys and wrong types are errors naming the key (with the closest
valid key as a suggestion). Cross-field rules live in `validate()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from posttrain import typed_config
from posttrain.errors import ConfigError
from posttrain.typed_config import build, opt, parse_override, set_dotted, yaml_error_text

# Methods that add virtual tokens (PEFT prompt / prefix tuning) instead of changing weights.
PROMPT_METHODS = ("prompt", "prefix")

__all__ = ["RunConfig", "describe_keys", "load_config", "parse_override", "save_config", "validate"]


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
class DatasetConfig:
    path: str = opt("", "a .json/.jsonl/.csv/.parquet file (relative paths: to the config file)")
    format: Literal["auto", "alpaca", "sharegpt", "openai", "text"] = opt(
        "auto", "row layout; auto-detected from the columns when 'auto'")
    weight: float = opt(1.0, "mixing weight: the dataset contributes round(weight * rows) samples (seeded)")
    max_samples: int | None = opt(None, "cap on rows taken from this file (after shuffling), None = all")
    columns: dict[str, str] = opt({}, "rename columns: {our_name: file_column}, e.g. {output: answer}")
    role_tags: dict[str, str] = opt({}, "sharegpt 'from' values -> roles, added to human/gpt/system/...")


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = opt([], "training datasets, mixed by weight / max_samples")
    eval_datasets: list[DatasetConfig] = opt([], "explicit evaluation sets (else val_size holds out)")
    val_size: float = opt(0.0, "held-out share of training rows: <1 a fraction, >=1 a count")
    max_length: int = opt(1024, "max tokens per sample; oldest turns go first, then the sample")
    packing: bool | Literal["auto"] = opt(
        False, "pack samples into max_length rows (attention never crosses samples); auto = pack on stage sft "
        "unless the method cannot (prompt/prefix tuning)")
    mask: Literal["all", "last", "full"] = opt(
        "all", "loss on: every assistant turn, the last assistant turn, or the whole sequence")
    variables: dict[str, str] = opt({}, "values for {{placeholders}} in the data, e.g. {name: Aria}")


@dataclass
class TemplateConfig:
    name: str = opt("auto", "auto = the tokenizer's own chat template; or chatml, llama3, alpaca, plain")
    system: str | None = opt(None, "system prompt for conversations without one (None: template default)")


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


# Default peak lr per method.type (SFT-scale; preference stages usually want lower, set optim.lr):
# virtual tokens need ~100x LoRA's lr (Lester et al. 2021 used 0.3), full fine-tuning ~10x less.
METHOD_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "freeze": 1e-4, "lisa": 5e-5, "prompt": 3e-2, "prefix": 1e-2}


@dataclass
class OptimConfig:
    lr: float | dict[str, float] | None = opt(
        None, "peak learning rate (AdamW): a number, or {method.type: lr} for some methods; a method not given one "
        "uses its default: " + ", ".join(f"{k} {v:g}" for k, v in METHOD_LR.items()))
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "lr decay after warmup")
    warmup_ratio: float = opt(0.0, "share of optimizer steps spent warming up linearly")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 = no clipping)")


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = opt(
        True, "free each block's gathered weights after its forward and gather them again for backward (less memory, "
        "one more all-gather per block); false keeps them from forward to backward")
    cpu_offload: bool = opt(
        False, "keep the sharded weights, gradients and optimizer state in CPU memory (CUDA runs: less GPU memory, "
        "the optimizer steps on the CPU)")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[2, 3] = opt(2, "ZeRO stage: 2 shards optimizer state and gradients, 3 also the weights")
    offload_optimizer: bool = opt(False, "ZeRO-Offload: optimizer state in CPU memory, the optimizer steps there")
    offload_params: bool = opt(False, "ZeRO-3 only: weights in CPU memory between uses")


@dataclass
class TrainConfig:
    epochs: float = opt(1.0, "passes over the training data (fractions allowed)")
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = from epochs)")
    micro_batch_size: int = opt(4, "samples (or packed rows) per forward pass per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    eval_every: int = opt(0, "evaluate every N optimizer steps (0 = only at the end)")
    save_every: int = opt(0, "checkpoint every N optimizer steps (0 = only the final model)")
    keep_last: int = opt(2, "checkpoints kept on disk; older ones are deleted")
    log_every: int = opt(1, "log metrics every N optimizer steps")
    seed: int = opt(42, "seed for data order, initialisation and sampling")
    resume: str | None = opt(None, "resume from a checkpoint folder, or 'auto' for the latest in output.dir")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to train; auto = cuda when available")
    loss_chunk: int = opt(1024, "positions per chunk of the LM head + cross-entropy (bounds logits memory)")
    head_positions: Literal["supervised", "all"] = opt(
        "supervised", "LM head at supervised positions only (fast), or at all (naive reference, for benchmarks)")
    fused: bool = opt(
        True, "fused LoRA linears and LM-head log-probs (same maths, fewer passes over memory); false = plain "
        "PEFT/autograd path (the reference for tests and benchmarks)")
    distributed: Literal["none", "ddp", "fsdp", "deepspeed"] = opt(
        "none", "engine of a multi-process run (torchrun / accelerate launch): none = one process; ddp = torch DDP "
        "(replicas, gradients all-reduced); fsdp = FSDP2 (weights, gradients and optimizer state sharded per decoder "
        "block, see train.fsdp); deepspeed = ZeRO-2/3 (see train.deepspeed; pip install 'posttrain[deepspeed]')")
    fsdp: FSDPConfig = opt(FSDPConfig(), "FSDP2 options (train.distributed=fsdp)")
    deepspeed: DeepSpeedConfig = opt(DeepSpeedConfig(), "DeepSpeed ZeRO options (train.distributed=deepspeed)")
    gradient_checkpointing: bool = opt(
        False, "recompute each decoder block's activations during backward (non-reentrant): far less activation "
        "memory for about one more forward pass")
    precision: Literal["fp32", "bf16", "fp16"] = opt(
        "fp32", "compute precision: bf16 / fp16 autocast the matmuls while trainable weights stay float32 (master "
        "weights); fp16 adds loss scaling and needs CUDA")


@dataclass
class OutputConfig:
    dir: str = opt("outputs/run", "run folder: model/adapter, checkpoints, logs, plots, summary")
    tensorboard: bool = opt(True, "also write TensorBoard event files under dir/logs")


@dataclass
class MultipleChoiceConfig:
    data: str = opt("", "benchmark folder with dev/ and val/ (or test/) per-subject CSVs, or a .jsonl file")
    split: str = opt("val", "split folder scored: val, test, ...")
    shots_split: str = opt("dev", "split folder the k-shot examples come from")
    shots: int = opt(5, "examples per prompt, 0-5, taken in order from shots_split of the same subject")
    subjects: list[str] = opt([], "subjects to score (empty = all)")
    max_per_subject: int | None = opt(None, "score only the first N questions of each subject (None = all)")
    language: Literal["auto", "zh", "en"] = opt("auto", "prompt wording; auto = zh when questions hold CJK text")
    prompt: Literal["plain", "chat"] = opt(
        "plain", "plain text (works for base and chat models) or wrapped as a user turn of the chat template")
    header: str | None = opt(None, "first line; {subject} is filled in (None: the language's default)")
    answer_cue: str | None = opt(None, "text before the letter, e.g. 'Answer:' (None: the language's default)")
    categories: dict[str, list[str]] = opt({}, "category -> subjects (empty: the built-in map category_map picks)")
    max_length: int = opt(2048, "prompt token limit; shots are dropped from the end until it fits")
    scoring: Literal["letter", "cloze", "calibrated"] = opt(
        "letter", "letter: option-letter log-prob after the cue; cloze: log-prob of each option's text after the "
                  "question (options not listed), per character; calibrated: letter log-prob minus the letter's "
                  "log-prob after a content-free 'N/A' prompt")
    category_map: Literal["auto", "ceval", "mmlu", "cmmlu", "none"] = opt(
        "auto", "built-in subject -> category map; auto: the detected layout's (C-Eval, MMLU, CMMLU), else the one "
                "holding the most subjects")
    shared_prefix: bool = opt(
        True, "score prompts that share a prefix (a subject's header and shots, a question's options) after one "
              "copy of it in packed rows; false: one padded row per prompt or option")


@dataclass
class CompareConfig:
    models: list[str] = opt([], "models to compare (2 or more): run dirs, model folders, built-in names, hub ids")
    prompts: str = opt("", "prompt file: {prompt, reference?, category?, id?} rows, or any SFT layout")
    judge: str = opt("", "reward-model folder, OpenAI-compatible base URL (http...), or 'reference' "
                         "(ROUGE-L against each prompt's reference answer)")
    judge_model: str = opt("gpt-4o-mini", "model name sent to an LLM judge endpoint")
    judge_max_tokens: int | None = opt(None, "reply length cap sent to an LLM judge (None: the endpoint's own)")
    judge_prompt: str = opt("", "LLM judge prompt with {question}, {answer_a}, {answer_b} (empty: MT-Bench style)")
    epsilon: float = opt(0.0, "tie margin: reward difference (reward model) or ROUGE-L F1 difference (reference)")
    max_new_tokens: int = opt(256, "answer length limit (greedy decoding)")
    rounds: int = opt(200, "bootstrap resamples for the rating intervals")
    seed: int = opt(0, "bootstrap seed")


@dataclass
class EvalConfig:
    task: Literal["mc", "compare"] = opt(
        "mc", "what `posttrain eval CONFIG` runs: mc (multiple-choice benchmark) or compare (pairwise, ratings)")
    model: str = opt("smollm2-135m-instruct", "run dir, model folder, built-in name or hub id to evaluate (mc)")
    output_dir: str = opt("outputs/eval", "where results JSON, per-item cache and reports go")
    batch_size: int = opt(8, "prompts per forward pass")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to run; auto = cuda when available")
    mc: MultipleChoiceConfig = opt(MultipleChoiceConfig(), "multiple-choice benchmark (C-Eval, CMMLU, MMLU, JSONL)")
    compare: CompareConfig = opt(CompareConfig(), "pairwise comparison of models judged per prompt (task compare)")


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
class RunConfig:
    stage: Literal["sft", "rm", "dpo", "ppo", "eval"] = opt(
        "sft", "what to run: sft, rm (reward model), dpo (DPO family), ppo (RLHF), eval (benchmark)")
    model: ModelConfig = opt(ModelConfig(), "base model")
    data: DataConfig = opt(DataConfig(), "datasets, lengths, masking")
    template: TemplateConfig = opt(TemplateConfig(), "chat template")
    method: MethodConfig = opt(MethodConfig(), "fine-tuning method")
    lora: LoraConfig = opt(LoraConfig(), "LoRA settings (method.type=lora)")
    freeze: FreezeConfig = opt(FreezeConfig(), "freeze settings (method.type=freeze)")
    quant: QuantConfig = opt(QuantConfig(), "4-bit base settings (method.type=qlora; bitsandbytes)")
    lisa: LisaConfig = opt(LisaConfig(), "LISA settings (method.type=lisa)")
    prompt: PromptConfig = opt(PromptConfig(), "virtual-token settings (method.type=prompt or prefix)")
    optim: OptimConfig = opt(OptimConfig(), "optimizer and schedule")
    train: TrainConfig = opt(TrainConfig(), "loop: batch, steps, eval, checkpoints")
    output: OutputConfig = opt(OutputConfig(), "where results go")
    eval: EvalConfig = opt(EvalConfig(), "evaluation (stage: eval)")
    reward: RewardConfig = opt(RewardConfig(), "stage ppo: the reward source and its shaping")
    ppo: PPOConfig = opt(PPOConfig(), "stage ppo: rollouts, KL control, PPO losses, ptx")
    rm: RewardModelConfig = opt(RewardModelConfig(), "reward-model stage (stage=rm)")
    dpo: DPOConfig = opt(DPOConfig(), "preference-optimisation stage (stage=dpo)")


def load_config(path: str | Path | None = None, overrides: list[str] = (), **tree_extra: Any) -> RunConfig:
    """Read YAML (or start from defaults), apply dotted overrides, type-check, validate."""
    tree: dict = {}
    base_dir = Path(".")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML at {yaml_error_text(err)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        base_dir = path.parent
    for dotted, value in tree_extra.items():
        set_dotted(tree, dotted, value)
    for item in overrides:
        set_dotted(tree, *parse_override(item))
    cfg = build(RunConfig, tree)
    for ds in cfg.data.datasets + cfg.data.eval_datasets + cfg.ppo.ptx_datasets:
        if ds.path and not Path(ds.path).is_absolute() and (base_dir / ds.path).exists():
            ds.path = str(base_dir / ds.path)
    cfg.rm.normalize_data = _beside_config(cfg.rm.normalize_data, base_dir)
    mc, cmp = cfg.eval.mc, cfg.eval.compare
    mc.data = _beside_config(mc.data, base_dir)
    cmp.prompts = _beside_config(cmp.prompts, base_dir)
    cmp.models = [_beside_config(m, base_dir) for m in cmp.models]
    cmp.judge = _beside_config(cmp.judge, base_dir)
    file_ref, sep, fn_name = cfg.reward.function.rpartition(":")
    if sep and file_ref.endswith(".py") and not Path(file_ref).is_absolute() and (base_dir / file_ref).exists():
        cfg.reward.function = f"{base_dir / file_ref}:{fn_name}"
    resolve_defaults(cfg)
    validate(cfg)
    return cfg


def _beside_config(path: str, base_dir: Path) -> str:
    """A relative path that exists next to the config file means that file; anything else is kept."""
    if path and not Path(path).is_absolute() and (base_dir / path).exists():
        return str(base_dir / path)
    return path


def resolve_defaults(cfg: RunConfig) -> None:
    """Fill the per-method defaults (optim.lr, data.packing=auto), so the saved config spells out what ran."""
    kind, lr = cfg.method.type, cfg.optim.lr
    if isinstance(lr, dict):
        unknown = sorted(set(lr) - set(METHOD_LR))
        if unknown:
            raise ConfigError(f"optim.lr: {unknown[0]!r} is not a method.type (one of {', '.join(METHOD_LR)})")
        lr = lr.get(kind)
    cfg.optim.lr = METHOD_LR[kind] if lr is None else float(lr)
    if cfg.data.packing == "auto":
        cfg.data.packing = cfg.stage == "sft" and kind not in PROMPT_METHODS


def adapter_off_is_base(cfg: RunConfig) -> bool:
    """True when the model with its adapter disabled is the loaded base model, the DPO / PPO reference (as a
    copy or precomputed log-probs would be): LoRA-family and virtual-token adapters, but not PiSSA, whose
    initialisation rewrites the base weights."""
    kind = cfg.method.type
    return kind in PROMPT_METHODS or (kind in ("lora", "qlora") and cfg.lora.init != "pissa")


def validate(cfg: RunConfig) -> None:
    """Cross-field rules, all in one place."""
    if cfg.stage == "eval":
        _validate_eval(cfg.eval)
        return
    if not cfg.model.name_or_path.strip():  # no silent default: a typo'd section must not train a random model
        raise ConfigError("model.name_or_path is required: a model folder, a hub id (org/name), or a built-in "
                          "(smollm2-135m-instruct, or tiny-random for a quick random test model)")
    if not cfg.data.datasets:
        raise ConfigError("data.datasets is empty: give at least one training file")
    for i, ds in enumerate(cfg.data.datasets + cfg.data.eval_datasets):
        if not ds.path:
            raise ConfigError(f"dataset #{i}: path is required")
    if cfg.data.val_size < 0:
        raise ConfigError("data.val_size must be >= 0")
    if cfg.data.max_length < 8:
        raise ConfigError("data.max_length must be at least 8")
    for key in ("micro_batch_size", "grad_accum", "log_every"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1")
    if cfg.train.max_steps < 0 or cfg.train.epochs < 0:
        raise ConfigError(f"train.max_steps and train.epochs must be >= 0, got train.max_steps={cfg.train.max_steps}, "
                          f"train.epochs={cfg.train.epochs}")
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        raise ConfigError("set train.epochs > 0 or train.max_steps > 0")
    if cfg.lora.r < 1:
        raise ConfigError("lora.r must be >= 1")
    _validate_method(cfg)
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ConfigError("optim.warmup_ratio must be in [0, 1)")
    if not isinstance(cfg.optim.lr, float) or cfg.optim.lr < 0:  # 0 is allowed: a run that only evaluates
        raise ConfigError(f"optim.lr must be a number >= 0, got {cfg.optim.lr!r}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas needs two values, e.g. [0.9, 0.999]")
    if cfg.stage == "ppo":
        _validate_ppo(cfg)
    _validate_engine(cfg)
    if cfg.stage in ("rm", "dpo") and cfg.data.packing:
        raise ConfigError(f"stage {cfg.stage}: data.packing must be false (each prompt's responses form one unit)")
    if cfg.dpo.beta <= 0 or not 0 <= cfg.dpo.label_smoothing < 0.5:
        raise ConfigError("dpo.beta must be > 0 and dpo.label_smoothing in [0, 0.5)")
    if cfg.stage == "dpo" and cfg.dpo.reference == "adapter" and not adapter_off_is_base(cfg):
        pissa = " with lora.init=pissa" if cfg.lora.init == "pissa" else ""
        raise ConfigError(f"dpo.reference=adapter needs an adapter whose removal gives the base model (lora, qlora, "
                          f"prompt, prefix; not PiSSA), not method.type={cfg.method.type}{pissa}; "
                          "use dpo.reference=copy or precompute")


def _validate_engine(cfg: RunConfig) -> None:
    """train.distributed / fsdp / deepspeed rules (the device-dependent ones are checked on joining)."""
    t = cfg.train
    sharded = t.distributed == "fsdp" or t.distributed == "deepspeed"
    if sharded and cfg.method.type == "qlora":
        raise ConfigError(f"train.distributed={t.distributed} does not shard a 4-bit (bitsandbytes) base: use "
                          "method.type=qlora with train.distributed=ddp or none, or method.type=lora")
    if sharded and cfg.method.type == "lisa":
        raise ConfigError(f"method.type=lisa changes which weights train every few steps, which "
                          f"train.distributed={t.distributed} cannot follow (its sharded optimizer is built once): "
                          "use ddp or none")
    if t.distributed == "deepspeed" and t.precision == "fp16":
        raise ConfigError("train.precision=fp16 with train.distributed=deepspeed is not supported (the loop's loss "
                          "scaler does not see inside ZeRO's optimizer): use bf16")
    if t.deepspeed.offload_params and t.deepspeed.zero_stage != 3:
        raise ConfigError("train.deepspeed.offload_params needs train.deepspeed.zero_stage=3 (stage 2 keeps whole "
                          "weights on every process)")


def _validate_ppo(cfg: RunConfig) -> None:
    p, r = cfg.ppo, cfg.reward
    if cfg.train.max_steps <= 0:
        raise ConfigError("stage ppo: set train.max_steps (the number of rollout batches)")
    if p.mini_batch_size < 1 or p.rollout_batch_size % p.mini_batch_size:
        raise ConfigError("ppo.rollout_batch_size must be a multiple of ppo.mini_batch_size (>= 1)")
    if p.ppo_epochs < 1 or p.max_new_tokens < 1 or p.temperature <= 0:
        raise ConfigError("ppo.ppo_epochs and ppo.max_new_tokens must be >= 1, ppo.temperature > 0")
    if p.ptx_coef > 0 and not p.ptx_datasets:
        raise ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_datasets (the LM-loss data)")
    if p.kl_control == "adaptive" and (p.kl_target <= 0 or p.kl_horizon < 1):
        raise ConfigError("ppo.kl_target must be > 0 and ppo.kl_horizon >= 1 for adaptive KL")
    needed = {"function": r.function, "model": r.model, "http": r.url}[r.type]
    if not needed:
        key = {"function": "function", "model": "model", "http": "url"}[r.type]
        raise ConfigError(f"reward.type={r.type} needs reward.{key}")
    if p.value_model == "separate" and cfg.method.type != "lora":
        raise ConfigError("ppo.value_model=separate is only supported with method.type=lora")


def _validate_eval(ev: EvalConfig) -> None:
    if ev.batch_size < 1:
        raise ConfigError("eval.batch_size must be >= 1")
    if ev.task == "compare":
        cmp = ev.compare
        if len(cmp.models) < 2 or len(set(cmp.models)) < len(cmp.models):
            raise ConfigError("eval.compare.models needs two or more different models")
        if not cmp.prompts or not cmp.judge:
            raise ConfigError("eval.compare needs prompts (a prompt file) and judge (RM folder, URL or 'reference')")
        short_judge = cmp.judge_max_tokens is not None and cmp.judge_max_tokens < 1
        if cmp.rounds < 1 or cmp.max_new_tokens < 1 or cmp.epsilon < 0 or short_judge:
            raise ConfigError("eval.compare.rounds, max_new_tokens and judge_max_tokens must be >= 1, epsilon >= 0")
        if cmp.judge_max_tokens is not None and not cmp.judge.startswith(("http://", "https://")):
            raise ConfigError("eval.compare.judge_max_tokens applies to an LLM judge only (judge: http...)")
        fields = ("{question}", "{answer_a}", "{answer_b}")
        if cmp.judge_prompt and not all(f in cmp.judge_prompt for f in fields):
            raise ConfigError(f"eval.compare.judge_prompt must contain {', '.join(fields)}")
        return
    if not ev.mc.data:
        raise ConfigError("eval.mc.data is empty: give a benchmark folder (e.g. C-Eval) or a .jsonl file")
    if not 0 <= ev.mc.shots <= 5:
        raise ConfigError("eval.mc.shots must be between 0 and 5")


def _validate_method(cfg: RunConfig) -> None:
    """Rules tying method.type to its section and to the data layout."""
    kind = cfg.method.type
    if cfg.lora.lr_ratio <= 0:
        raise ConfigError("lora.lr_ratio must be > 0 (1 = plain LoRA, 16 = the LoRA+ paper's choice)")
    if cfg.lora.init == "pissa" and cfg.lora.use_dora:
        raise ConfigError("lora.init=pissa cannot be combined with lora.use_dora")
    if kind == "qlora" and cfg.lora.init == "pissa":
        raise ConfigError("lora.init=pissa needs the full-precision base: use method.type=lora")
    if kind == "lisa" and (cfg.lisa.layers < 1 or cfg.lisa.interval < 1):
        raise ConfigError("lisa.layers and lisa.interval must be >= 1")
    if kind in PROMPT_METHODS:
        if cfg.prompt.num_virtual_tokens < 1:
            raise ConfigError("prompt.num_virtual_tokens must be >= 1")
        # PEFT drops position ids for virtual tokens, so packed rows would attend across samples.
        if cfg.data.packing:
            raise ConfigError(f"method.type={kind} cannot train on packed rows: set data.packing=false")
        if kind == "prefix" and cfg.prompt.init_text:
            raise ConfigError("prompt.init_text applies to method.type=prompt only (prefix starts random)")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (every default spelled out) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")


def describe_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf key: the source of `posttrain keys`."""
    return typed_config.describe_keys(cls, prefix)
