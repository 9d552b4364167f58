"""Reward-model stage, read top to bottom: config -> preference data -> causal LM + scalar head -> loop.

The model is transformers' own `*ForSequenceClassification` (num_labels=1): a linear `score` head
on the last non-pad token. The run folder is saved as a plain HF sequence-classification model
(LoRA merged in; a QLoRA base de-quantised first), so `posttrain score`, the PPO stage and plain
transformers all load it. Prompt / prefix tuning cannot be merged: those runs save a PEFT adapter
(virtual tokens + head) that `load_reward_model` puts back on its base.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import torch

from posttrain.config import RunConfig
from posttrain.data.preference import PrefSample, build_preference_data, collate_preferences
from posttrain.errors import ModelSourceError
from posttrain.losses import pairwise_reward_loss
from posttrain.models.methods import (apply_method, count_parameters, is_prompt_learning, optimizer_groups,
                                      quantization_config, step_hook, unwrap)
from posttrain.train.loop import Batches, Loop, start_run

log = logging.getLogger("posttrain")


def load_reward_model(model_cfg, device, tokenizer=None, quantization_config=None):
    """(seq-classification model with one label, tokenizer) from any causal LM, a saved reward model, or a
    saved virtual-token reward adapter; `quantization_config` loads the base in 4 bits (QLoRA)."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.load import _hub_local_only, load_tokenizer, one_4bit_kernel, pick_dtype
    from posttrain.models.sources import resolve_model

    path = resolve_model(model_cfg.name_or_path)
    tokenizer = tokenizer or load_tokenizer(path, model_cfg.revision, model_cfg.trust_remote_code)
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():  # prompt / prefix reward model: its base, then the adapter and trained head
        from peft import PeftModel

        base_name = json.loads(adapter.read_text())["base_model_name_or_path"]
        base, _ = load_reward_model(dataclasses.replace(model_cfg, name_or_path=base_name), device, tokenizer)
        return PeftModel.from_pretrained(base, path).to(device), tokenizer
    kwargs = {} if quantization_config is None else {"quantization_config": quantization_config,
                                                     "device_map": str(device)}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=pick_dtype(model_cfg.dtype, device),
            attn_implementation=model_cfg.attn_implementation, trust_remote_code=model_cfg.trust_remote_code,
            local_files_only=_hub_local_only(path, model_cfg.revision, "config.json"), **kwargs)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"could not load {path} as a reward model: {err}") from None
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last token that is not pad
    if quantization_config is None:
        return model.to(device), tokenizer
    one_4bit_kernel(model)
    return model, tokenizer


def sequence_rewards(model, batch: dict) -> torch.Tensor:
    """(R,) scalar reward of each right-padded row, exactly as plain transformers computes it."""
    input_ids = batch["input_ids"]  # (R, T)
    if not is_prompt_learning(model):
        return model(input_ids=input_ids, use_cache=False).logits[:, 0].float()
    # Prompt tuning feeds embeddings, so transformers' head would read the last (padding) position:
    # take each row's last non-pad token ourselves, by the rule transformers uses for input ids.
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -input_ids.shape[1]:]  # (R, T, H) the real positions
    inner = unwrap(model)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = ((input_ids != inner.config.pad_token_id) * positions).argmax(-1)  # (R,)
    return inner.score(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


def rm_forward(model, batch: dict, normalizer: float, center_coef: float = 0.0):
    rewards = sequence_rewards(model, batch)  # (R,)
    return pairwise_reward_loss(rewards, batch["pair_better"], batch["pair_worse"], batch["pair_margin"],
                                batch["pair_weight"], normalizer, center_coef)


def to_batches(samples: list[PrefSample], pad_id: int) -> Batches:
    """One unit per prompt; loss_tokens=1 makes the loop's normaliser the prompt count."""
    return Batches(lengths=[max(len(x) for x in s.input_ids) for s in samples], loss_tokens=[1] * len(samples),
                   collate=functools.partial(collate_preferences, samples=samples, pad_id=pad_id))


def save_reward_model(model, tokenizer, out_dir: Path, cfg: RunConfig | None = None) -> None:
    """A plain HF folder (LoRA merged into the base, the trained head under `score`), or for prompt /
    prefix tuning the PEFT adapter with its head."""
    from posttrain.models.run import is_peft_model

    if is_peft_model(model) and not is_prompt_learning(model):
        if cfg is not None and cfg.method.type == "qlora":
            model = _merge_on_dequantized_base(model, tokenizer, cfg)
        else:
            model = model.merge_and_unload()  # the end of the run: merging in place is fine
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _merge_on_dequantized_base(model, tokenizer, cfg: RunConfig):
    """Merging into 4-bit weights would round the update away: reload the base, de-quantise it to the
    NF4-rounded float weights the adapter trained on, and merge there."""
    import tempfile

    from peft import PeftModel

    device = next(model.parameters()).device
    log.warning("QLoRA reward model: the 4-bit base is de-quantised to float before the adapter is merged")
    with tempfile.TemporaryDirectory(prefix="posttrain-qlora-rm-") as tmp:
        model.save_pretrained(tmp)
        base, _ = load_reward_model(cfg.model, device, tokenizer, quantization_config(cfg, device))
        return PeftModel.from_pretrained(base.dequantize(), tmp).merge_and_unload()


def run(cfg: RunConfig) -> dict:
    dist_ctx, out_dir = start_run(cfg)

    model, tokenizer = load_reward_model(cfg.model, dist_ctx.device,
                                         quantization_config=quantization_config(cfg, dist_ctx.device))
    data = build_preference_data(cfg.data, cfg.template, tokenizer, cfg.train.seed)
    if data.drops:
        log.warning("dropped preference rows: %s", ", ".join(f"{k}={v}" for k, v in sorted(data.drops.items())))
    model = apply_method(model, cfg, task_type="SEQ_CLS")
    for name, param in model.named_parameters():  # the head always trains (freeze/full too)
        if ".score." in f".{name}" and "original_module" not in name:
            param.requires_grad_(True)
    hook = step_hook(model, cfg)
    trainable, total = count_parameters(model)
    if hook is not None:  # LISA: what trains in one step (the frozen blocks take turns)
        trainable = hook.trainable_per_step(model)
    n_pairs = sum(len(sample.pairs) for sample in data.train)
    log.info("prompts: %d train (%d ranked pairs), %d eval; trainable parameters %d of %d", len(data.train),
             n_pairs, len(data.eval or []), trainable, total)

    pad_id = tokenizer.pad_token_id
    loop = Loop(cfg, model, to_batches(data.train, pad_id),
                functools.partial(rm_forward, center_coef=cfg.rm.center_coef),
                eval_data=to_batches(data.eval, pad_id) if data.eval else None, dist_ctx=dist_ctx,
                param_groups=optimizer_groups(model, cfg), on_step_start=hook)
    extra = {"stage": "rm", "method": cfg.method.type, "train_prompts": len(data.train), "train_pairs": n_pairs,
             "eval_prompts": len(data.eval or []), "rows_read": data.n_rows, "dropped": data.drops,
             "trainable_params": trainable, "total_params": total}
    return loop.run(lambda d: save_reward_model(model, tokenizer, d, cfg), extra_summary=extra)


@torch.no_grad()
def score_preferences(run_dir: str, data_path: str, batch_size: int = 8, device: str | None = None) -> dict:
    """Score every response of a preference file with a saved reward model; pairwise accuracy etc.

    Rendering (template, system, max_length) follows the run's config.yaml when there is one.
    """
    from collections import Counter

    from posttrain.config import DatasetConfig, ModelConfig, RunConfig, load_config
    from posttrain.data.preference import encode_all, read_preferences
    from posttrain.models.load import pick_device
    from posttrain.models.run import find_run_config
    from posttrain.templates.render import apply_template

    cfg_path = find_run_config(Path(run_dir)) if Path(run_dir).is_dir() else None
    cfg = load_config(cfg_path) if cfg_path is not None else RunConfig()
    dev = pick_device(device or cfg.train.device)
    model_cfg = ModelConfig(name_or_path=str(run_dir), dtype=cfg.model.dtype,
                            attn_implementation=cfg.model.attn_implementation)
    model, tokenizer = load_reward_model(model_cfg, dev)
    model.eval()
    apply_template(tokenizer, cfg.template.name)
    drops: Counter = Counter()
    samples = encode_all(read_preferences(DatasetConfig(path=data_path), cfg.data.variables), tokenizer,
                         cfg.data.max_length, cfg.template.system, drops)
    batches = to_batches(samples, tokenizer.pad_token_id)
    rewards: list[float] = []
    for start in range(0, len(samples), batch_size):
        units = [[i] for i in range(start, min(start + batch_size, len(samples)))]
        batch = {k: v.to(dev) for k, v in batches.collate(units).items()}
        rewards += sequence_rewards(model, batch).tolist()
    per_sample, pos = [], 0
    for s in samples:
        per_sample.append(rewards[pos:pos + len(s.input_ids)])
        pos += len(s.input_ids)
    gaps = [r[b] - r[w] for s, r in zip(samples, per_sample) for b, w in s.pairs]
    all_r = torch.tensor(rewards) if rewards else torch.zeros(1)
    return {"prompts": len(samples), "pairs": len(gaps), "dropped": dict(drops),
            "accuracy": sum(g > 0 for g in gaps) / max(len(gaps), 1),
            "mean_margin": sum(gaps) / max(len(gaps), 1),
            "reward_mean": float(all_r.mean()), "reward_std": float(all_r.std()) if len(rewards) > 1 else 0.0,
            "scores": [{"source": s.source, "rewards": r} for s, r in zip(samples, per_sample)]}
