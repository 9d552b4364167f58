"""Fine-tuning methods: decide which weights train.

LoRA (with DoRA / rsLoRA / PiSSA / LoRA+ / modules_to_save), QLoRA (LoRA on a 4-bit base),
full, freeze, LISA (see models/lisa.py), prompt and prefix tuning. Every function reads the method
sections bundled as `Methods` (models/config.py). A stage calls, in order: `quantization_config(methods,
device)` when loading the base, `apply_method(model, methods, ...)`, then hands `optimizer_groups(model,
methods, lr)` and `step_hook(model, methods, seed)` to the Loop. Which blocks a model has and where its
head sits is models/anatomy.py.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from collections.abc import Callable

import torch
from torch import nn

from posttrain.errors import ConfigError
from posttrain.models.config import PROMPT_METHODS, FreezeConfig, LoraConfig, Methods
from posttrain.models.anatomy import find_layers, unwrap
from posttrain.models.lisa import LisaSchedule, apply_lisa, lisa_parameters
from posttrain.models.fast_lora import enable_fast_lora
from posttrain.models.onednn_linear import enable_training_products
from posttrain.models.load import pick_dtype
from posttrain.models.sources import resolve_model


def apply_method(model: nn.Module, methods: Methods, *, task_type: str = "CAUSAL_LM", fused: bool = True,
                 base_model: str = "") -> nn.Module:
    """Prepare `model` for training under `methods.type`; returns the (possibly wrapped) model.

    task_type SEQ_CLS (reward models) makes PEFT train and save the `score` head beside the adapters
    (LoRA family and virtual tokens alike). fused: LoRA linears in one autograd op each, plain linear layers'
    training products through oneDNN on a CPU (false: PEFT's own path and torch's, the reference). base_model:
    the model reference, whose tokenizer reads prompt.init_text.
    """
    model = _apply(model, methods, task_type, fused, base_model)
    if fused:  # plain linear layers' training products through oneDNN on a CPU (models/onednn_linear.py)
        enable_training_products(model)
    if task_type == "SEQ_CLS":  # a reward model's head always trains (freeze, full and LISA too)
        for name, param in model.named_parameters():
            if ".score." in f".{name}" and "original_module" not in name:
                param.requires_grad_(True)
    return model


def _apply(model: nn.Module, methods: Methods, task_type: str, fused: bool, base_model: str) -> nn.Module:
    kind = methods.type
    if kind in ("lora", "qlora"):  # qlora = lora on a base loaded with quantization_config()
        model = apply_lora(model, methods.lora, task_type)
        if fused:  # same maths in one autograd op per linear (models/fast_lora.py)

            enable_fast_lora(model)
        return model
    if kind == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if kind == "freeze":
        return _apply_freeze(model, methods.freeze)
    if kind == "lisa":
        return apply_lisa(model)
    if kind in PROMPT_METHODS:
        return _apply_virtual_tokens(model, methods, task_type, base_model)
    if kind == "projector":
        raise ConfigError("method.type=projector trains a vision projector: stage sft with vision.tower set or a "
                          "LLaVA model")
    raise ConfigError(f"method.type {kind!r} is not one of lora, qlora, full, freeze, lisa, prompt, prefix")


def quantization_config(methods: Methods, device: torch.device | str):
    """BitsAndBytesConfig for method.type=qlora (None otherwise): 4-bit base, compute dtype for the device."""
    if methods.type != "qlora":
        return None
    from transformers import BitsAndBytesConfig  # heavy: transformers, ~3 s

    q = methods.quant
    # bf16 matmuls are 13-20x slower than fp32 on CPUs without BF16 instructions: auto picks fp32 on CPU.
    compute = pick_dtype(q.compute_dtype, device)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute)


def optimizer_groups(model: nn.Module, methods: Methods, lr: float) -> list[dict]:
    """AdamW parameter groups: LoRA+ gives B its own lr (lr x lora.lr_ratio); LISA hands over every block it
    may unfreeze."""
    if methods.type == "lisa":
        return [{"params": lisa_parameters(model)}]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = methods.lora.lr_ratio if methods.type in ("lora", "qlora") else 1.0
    if ratio == 1.0:
        return [{"params": [p for _, p in params]}]
    lora_b = [p for n, p in params if "lora_B" in n]
    rest = [p for n, p in params if "lora_B" not in n]
    return [{"params": rest}, {"params": lora_b, "lr": lr * ratio}]


def step_hook(model: nn.Module, methods: Methods, seed: int) -> Callable[[int, torch.optim.Optimizer], None] | None:
    """Called by the Loop before every optimizer step (LISA re-draws its blocks, seeded); None for other methods."""
    if methods.type != "lisa":
        return None
    return LisaSchedule(model, methods.lisa, seed=seed)


def apply_lora(model: nn.Module, lora_cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig  # heavy: peft, ~3 s
    from peft import TaskType, get_peft_model  # heavy: peft, ~3 s

    targets = list(lora_cfg.target_modules)
    # PEFT only expands the bare string "all-linear" (every linear but the output head).
    target_modules = "all-linear" if targets == ["all-linear"] else targets
    if "all-linear" in targets and len(targets) > 1:
        raise ConfigError("lora.target_modules: 'all-linear' cannot be combined with other names")
    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[lora_cfg.init]
    peft_cfg = PeftLoraConfig(
        task_type=TaskType[task_type], r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout, target_modules=target_modules, use_dora=lora_cfg.use_dora,
        use_rslora=lora_cfg.use_rslora, init_lora_weights=init,
        modules_to_save=list(lora_cfg.modules_to_save) or None,
    )
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as err:  # e.g. "Target modules {...} not found in the base model"
        raise ConfigError(f"lora.target_modules {targets}: {err}") from None
    if lora_cfg.init == "pissa":
        _keep_pissa_init(model)
    return model


def _keep_pissa_init(model: nn.Module) -> None:
    """PiSSA rewrites the base weights (W - AB); keep the initial adapter so saving can convert the
    trained one into a plain LoRA that applies to the untouched base (PEFT's weight conversion).

    Every save (checkpoints, the final model) needs it, so it lives as long as the model: removed
    when the model is garbage-collected, or at interpreter exit at the latest."""
    init_dir = tempfile.mkdtemp(prefix="posttrain-pissa-init-")
    weakref.finalize(model, shutil.rmtree, init_dir, ignore_errors=True)
    config = model.peft_config["default"]
    config.init_lora_weights = True  # saved as a plain init so loading it never re-runs the SVD
    model.save_pretrained(init_dir)
    config.init_lora_weights = "pissa"
    model.posttrain_pissa_init = init_dir


def _apply_virtual_tokens(model: nn.Module, methods: Methods, task_type: str, base_model: str) -> nn.Module:
    """Prompt tuning (Lester et al. 2021) or prefix tuning (Li & Liang 2021) through PEFT."""
    from peft import (PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType,  # heavy: peft, ~3 s
                      get_peft_model)

    p, task = methods.prompt, TaskType[task_type]
    if methods.type == "prefix":
        peft_cfg = PrefixTuningConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens,
                                      prefix_projection=p.prefix_projection)
    elif p.init_text:
        peft_cfg = PromptTuningConfig(
            task_type=task, num_virtual_tokens=p.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=p.init_text,
            tokenizer_name_or_path=resolve_model(base_model))
    else:
        peft_cfg = PromptTuningConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens)
    return get_peft_model(model, peft_cfg)




def _apply_freeze(model: nn.Module, freeze_cfg: FreezeConfig) -> nn.Module:
    layers_prefix, layers = find_layers(model)
    n = freeze_cfg.trainable_layers
    if n < 0:
        raise ConfigError("freeze.trainable_layers must be >= 0")
    first = max(len(layers) - n, 0)
    # Names are relative to the unwrapped model; match "<prefix>.<index>." exactly so 1 != 10.
    layer_re = re.compile(re.escape(layers_prefix) + r"\.(\d+)\.")
    modules = list(freeze_cfg.trainable_modules)
    for name, param in unwrap(model).named_parameters():
        match = layer_re.match(name)
        in_tail = n > 0 and match is not None and int(match.group(1)) >= first
        param.requires_grad_(in_tail or any(m in name for m in modules))
    if count_parameters(model)[0] == 0:
        raise ConfigError(
            f"freeze: nothing would train (trainable_layers={n}, trainable_modules={modules}); "
            f"the model has {len(layers)} blocks")
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied tensors count once (parameters() de-duplicates).

    A 4-bit (bitsandbytes) weight packs two values per byte: it counts as its original shape.
    """
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(_n_values(p) for p in params)


def _n_values(param: torch.Tensor) -> int:
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


