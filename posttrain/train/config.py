"""A training run's config: YAML + dotted `key=value` overrides -> a typed, validated, nested dataclass.

`RunConfig` composes the sections each package owns (model and methods: models/config.py; data:
data/config.py; template: templates/config.py; the stage sections: train/stage_config.py) with the
loop's own (optim, train, output, here). Every default lives once beside a one-line doc
(`posttrain keys`). Unknown keys and wrong types are errors naming the key (with the closest valid key
as a suggestion); a section another stage reads is an error naming it. Cross-field rules live in
`validate()`. A run saves only the sections it uses (`save_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from posttrain import typed_config
from posttrain.data.config import DataConfig
from posttrain.errors import ConfigError
from posttrain.models.config import (METHOD_LR, METHOD_SECTIONS, PROMPT_METHODS, FreezeConfig, LisaConfig,
                                     LoraConfig, MethodConfig, Methods, ModelConfig, PromptConfig, QuantConfig)
from posttrain.models.vision_config import VisionConfig, validate_vision
from posttrain.templates.config import TemplateConfig
from posttrain.train.engine_config import DeepSpeedConfig, FSDPConfig, validate_engine
from posttrain.train.stage_config import (STAGE_SECTIONS, DPOConfig, GRPOConfig, KTOConfig, PPOConfig, RewardConfig,
                                          RewardModelConfig, validate_dpo, validate_grpo, validate_kto,
                                          validate_ppo)
from posttrain.typed_config import beside, build, opt, read_tree, save_yaml

# Sections every training run has (the stage's and the method's own come on top).
RUN_SECTIONS = ("stage", "model", "data", "template", "method", "optim", "train", "output")


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
    keep_freed_memory: bool = opt(
        True, "glibc malloc keeps freed host memory in the process (no mmap per large tensor, no trimming), so each "
        "step reuses resident pages instead of page-faulting fresh ones (models/host_memory.py); ignored when a "
        "MALLOC_*_ environment variable is set")
    # ---- multi-process engine and numerics (train/engine_config.py: sections and rules)
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
class RunConfig:
    stage: Literal["sft", "rm", "dpo", "kto", "ppo", "grpo"] = opt(
        "sft", "what to train: sft, rm (reward model), dpo (DPO family), kto (unpaired good / bad labels), ppo "
        "(RLHF), grpo (GRPO / RLOO with verifiable rewards); a run config holds only its "
        "stage's sections (eval configs say stage: eval and run with posttrain eval)")
    model: ModelConfig = opt(ModelConfig(), "base model")
    data: DataConfig = opt(DataConfig(), "datasets, lengths, masking")
    template: TemplateConfig = opt(TemplateConfig(), "chat template")
    method: MethodConfig = opt(MethodConfig(), "fine-tuning method")
    lora: LoraConfig = opt(LoraConfig(), "LoRA settings (method.type=lora)")
    freeze: FreezeConfig = opt(FreezeConfig(), "freeze settings (method.type=freeze)")
    quant: QuantConfig = opt(QuantConfig(), "4-bit base settings (method.type=qlora; bitsandbytes)")
    lisa: LisaConfig = opt(LisaConfig(), "LISA settings (method.type=lisa)")
    prompt: PromptConfig = opt(PromptConfig(), "virtual-token settings (method.type=prompt or prefix)")
    vision: VisionConfig = opt(VisionConfig(), "stage sft: a vision tower + projector make the model a LLaVA")
    optim: OptimConfig = opt(OptimConfig(), "optimizer and schedule")
    train: TrainConfig = opt(TrainConfig(), "loop: batch, steps, eval, checkpoints")
    output: OutputConfig = opt(OutputConfig(), "where results go")
    reward: RewardConfig = opt(RewardConfig(), "stages ppo and grpo: the reward source(s) and their shaping")
    ppo: PPOConfig = opt(PPOConfig(), "stage ppo: rollouts, KL control, PPO losses, ptx")
    grpo: GRPOConfig = opt(GRPOConfig(), "stage grpo: groups, advantage estimator, clipped token loss, KL")
    rm: RewardModelConfig = opt(RewardModelConfig(), "reward-model stage (stage=rm)")
    dpo: DPOConfig = opt(DPOConfig(), "preference-optimisation stage (stage=dpo)")
    kto: KTOConfig = opt(KTOConfig(), "KTO stage (stage=kto): unpaired desirable / undesirable responses")

    @property
    def methods(self) -> Methods:
        """The method sections bundled for models/methods.py."""
        return Methods.of(self)


STAGES: tuple[str, ...] = get_args(get_type_hints(RunConfig)["stage"])


def load_config(path: str | Path | None = None, overrides: list[str] = (), **tree_extra: Any) -> RunConfig:
    """Read YAML (or start from defaults), apply dotted overrides, type-check, validate."""
    tree, base_dir = read_tree(path, overrides, tree_extra)
    _check_sections(tree, path)
    cfg = build(RunConfig, tree)
    for ds in cfg.data.datasets + cfg.data.eval_datasets + cfg.ppo.ptx_datasets:
        ds.path = beside(ds.path, base_dir)
    cfg.rm.normalize_data = beside(cfg.rm.normalize_data, base_dir)
    for source in [cfg.reward, *cfg.reward.sources]:
        file_ref, sep, fn_name = source.function.rpartition(":")
        if sep and file_ref.endswith(".py") and not Path(file_ref).is_absolute() and (base_dir / file_ref).exists():
            source.function = f"{base_dir / file_ref}:{fn_name}"
    resolve_defaults(cfg)
    validate(cfg)
    return cfg


def _check_sections(tree: dict, path: str | Path | None) -> None:
    """An eval config, or a section of another stage, is an error naming it (never silently unused)."""
    stage = tree.get("stage", "sft")
    if stage == "eval":  # `posttrain eval FILE` reads these (eval/config.py)
        raise ConfigError(f"{path or 'this config'} is an eval config (stage: eval): run it with "
                          f"posttrain eval {path or 'FILE'}")
    if "eval" in tree:
        raise ConfigError(f"config section eval applies to eval configs (stage: eval, run with posttrain eval), "
                          f"not stage {stage}")
    if not isinstance(stage, str) or stage not in STAGE_SECTIONS:
        return  # build() names a bad stage and the valid ones
    for owner, sections in STAGE_SECTIONS.items():
        for section in sections:
            if section in tree and section not in STAGE_SECTIONS[stage]:
                raise ConfigError(f"config section {section} applies to stage {owner}, not {stage}")


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


def validate(cfg: RunConfig) -> None:
    """Cross-field rules, all in one place."""
    if not cfg.model.name_or_path.strip():  # no silent default: a typo'd section must not train a random model
        raise ConfigError("model.name_or_path is required: a model folder, a hub id (org/name), or a built-in "
                          "(smollm2-135m-instruct, or tiny-random for a quick random test model)")
    if not cfg.data.datasets:
        raise ConfigError("data.datasets is empty: give at least one training file")
    for i, ds in enumerate(cfg.data.datasets + cfg.data.eval_datasets):
        if not ds.path:
            raise ConfigError(f"dataset #{i}: path is required")
        if ds.score_epsilon < 0 or ds.score_margin < 0:
            raise ConfigError(f"dataset #{i}: score_epsilon and score_margin must be >= 0")
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
    validate_vision(cfg.vision, cfg.method.type)
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ConfigError("optim.warmup_ratio must be in [0, 1)")
    if not isinstance(cfg.optim.lr, float) or cfg.optim.lr < 0:  # 0 is allowed: a run that only evaluates
        raise ConfigError(f"optim.lr must be a number >= 0, got {cfg.optim.lr!r}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas needs two values, e.g. [0.9, 0.999]")
    if cfg.stage == "ppo":
        validate_ppo(cfg.ppo, cfg.reward, cfg.train.max_steps, cfg.method.type)
    if cfg.stage == "grpo":
        validate_grpo(cfg.grpo, cfg.reward, cfg.train.max_steps)
    if cfg.stage == "kto":
        validate_kto(cfg.kto)
    validate_engine(cfg.train, cfg.method.type)
    if cfg.stage in ("rm", "dpo", "kto") and cfg.data.packing:
        raise ConfigError(f"stage {cfg.stage}: data.packing must be false (each prompt's responses form one unit)")
    if cfg.stage == "dpo":
        validate_dpo(cfg.dpo, cfg.methods)


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


def resolve_tree(tree: dict) -> dict:
    """A run config given as {dotted key: value} -> its resolved tree (what save_config writes); errors as
    load_config's. The UI's Train tab validates through this (handed in by the CLI)."""
    return to_tree(load_config(None, [], **tree))


def to_tree(cfg: RunConfig) -> dict:
    """The resolved config as a run saves it: every key of the sections it uses (its stage's, its method's)."""
    used = {*RUN_SECTIONS, *STAGE_SECTIONS[cfg.stage], *METHOD_SECTIONS[cfg.method.type]}
    if cfg.vision == VisionConfig():  # a text run: no vision section
        used.discard("vision")
    return {name: value for name, value in dataclasses.asdict(cfg).items() if name in used}


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (every default of the sections the run uses spelled out) as YAML."""
    save_yaml(to_tree(cfg), path)


def describe_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf key of a training config: the source of `posttrain keys`."""
    return typed_config.describe_keys(cls, prefix)
