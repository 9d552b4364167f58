"""Reward-model stage, read top to bottom: config -> preference data -> causal LM + scalar head -> loop.

The model is transformers' own `*ForSequenceClassification` (num_labels=1): a linear `score` head
on the last non-pad token. The run folder is saved as a plain HF sequence-classification model
(LoRA merged in), so `posttrain score`, the PPO stage and plain transformers all load it.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from posttrain.config import RunConfig
from posttrain.data.preference import PrefSample, build_preference_data, collate_preferences
from posttrain.errors import ModelSourceError
from posttrain.losses import pairwise_reward_loss
from posttrain.models.methods import apply_method, count_parameters
from posttrain.train.loop import Batches, Loop, start_run

log = logging.getLogger("posttrain")


def load_reward_model(model_cfg, device, tokenizer=None):
    """(seq-classification model with one label, tokenizer) from any causal LM or a saved reward model."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.load import _hub_local_only, load_tokenizer, pick_dtype
    from posttrain.models.sources import resolve_model

    path = resolve_model(model_cfg.name_or_path)
    tokenizer = tokenizer or load_tokenizer(path, model_cfg.revision, model_cfg.trust_remote_code)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=pick_dtype(model_cfg.dtype, device),
            attn_implementation=model_cfg.attn_implementation, trust_remote_code=model_cfg.trust_remote_code,
            local_files_only=_hub_local_only(path, model_cfg.revision, "config.json"))
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"could not load {path} as a reward model: {err}") from None
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last token that is not pad
    return model.to(device), tokenizer


def sequence_rewards(model, batch: dict) -> torch.Tensor:
    """(R,) scalar reward of each right-padded row, exactly as plain transformers computes it."""
    return model(input_ids=batch["input_ids"], use_cache=False).logits[:, 0].float()


def rm_forward(model, batch: dict, normalizer: float, center_coef: float = 0.0):
    rewards = sequence_rewards(model, batch)  # (R,)
    return pairwise_reward_loss(rewards, batch["pair_better"], batch["pair_worse"], batch["pair_margin"],
                                batch["pair_weight"], normalizer, center_coef)


def to_batches(samples: list[PrefSample], pad_id: int, pack: bool = False, share_prompt: bool = False) -> Batches:
    """One unit per prompt; loss_tokens=1 makes the loop's normaliser the prompt count.

    pack / share_prompt: see collate_preferences (DPO; a reward model reads one row per sequence)."""
    return Batches(lengths=[max(len(x) for x in s.input_ids) for s in samples], loss_tokens=[1] * len(samples),
                   collate=functools.partial(collate_preferences, samples=samples, pad_id=pad_id, pack=pack,
                                             share_prompt=share_prompt))


def save_reward_model(model, tokenizer, out_dir: Path) -> None:
    """A plain HF folder: LoRA merged into the base, the trained head under `score`."""
    from posttrain.models.run import is_peft_model

    if is_peft_model(model):
        model = model.merge_and_unload()  # the end of the run: merging in place is fine
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def run(cfg: RunConfig) -> dict:
    dist_ctx, out_dir = start_run(cfg)

    model, tokenizer = load_reward_model(cfg.model, dist_ctx.device)
    data = build_preference_data(cfg.data, cfg.template, tokenizer, cfg.train.seed)
    if data.drops:
        log.warning("dropped preference rows: %s", ", ".join(f"{k}={v}" for k, v in sorted(data.drops.items())))
    model = apply_method(model, cfg, task_type="SEQ_CLS")
    for name, param in model.named_parameters():  # the head always trains (freeze/full too)
        if ".score." in f".{name}" and "original_module" not in name:
            param.requires_grad_(True)
    trainable, total = count_parameters(model)
    n_pairs = sum(len(sample.pairs) for sample in data.train)
    log.info("prompts: %d train (%d ranked pairs), %d eval; trainable parameters %d of %d", len(data.train),
             n_pairs, len(data.eval or []), trainable, total)

    pad_id = tokenizer.pad_token_id
    loop = Loop(cfg, model, to_batches(data.train, pad_id),
                functools.partial(rm_forward, center_coef=cfg.rm.center_coef),
                eval_data=to_batches(data.eval, pad_id) if data.eval else None, dist_ctx=dist_ctx)
    extra = {"stage": "rm", "method": cfg.method.type, "train_prompts": len(data.train), "train_pairs": n_pairs,
             "eval_prompts": len(data.eval or []), "rows_read": data.n_rows, "dropped": data.drops,
             "trainable_params": trainable, "total_params": total}
    return loop.run(lambda d: save_reward_model(model, tokenizer, d), extra_summary=extra)


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
