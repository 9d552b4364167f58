"""Reward-model stage, read top to bottom: config -> preference data -> causal LM + scalar head -> loop.

The model is transformers' own `*ForSequenceClassification` (num_labels=1): a linear `score` head
on the last non-pad token. The run folder is saved as a plain HF sequence-classification model
(LoRA merged in; a QLoRA base de-quantised first), so `posttrain score`, the PPO stage and plain
transformers all load it. Prompt / prefix tuning cannot be merged: those runs save a PEFT adapter
(virtual tokens + head) that `load_reward_model` puts back on its base. With `rm.normalize_data`, a
reward offset is stored too (see models/reward_head.py).
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

from posttrain.train.config import RunConfig
from posttrain.data.batches import preference_batches
from posttrain.data.preference import build_preference_data
from posttrain.data.references import reference_ids
from posttrain.losses import pairwise_reward_loss
from posttrain.models.load import REWARD_OFFSET, REWARD_OFFSET_FILE, load_reward_model
from posttrain.models.anatomy import is_prompt_learning, unwrap
from posttrain.models.methods import quantization_config
from posttrain.models.reward_head import fit_offset, sequence_rewards
from posttrain.train.loop import Loop, start_run
from posttrain.train.setup import prepare_model
from posttrain.train.steps import DataSteps
from posttrain.models.run import is_peft_model

log = logging.getLogger("posttrain")


def rm_forward(model, batch: dict, normalizer: float, center_coef: float = 0.0):
    rewards = sequence_rewards(model, batch)  # (R,)
    return pairwise_reward_loss(rewards, batch["pair_better"], batch["pair_worse"], batch["pair_margin"],
                                batch["pair_weight"], normalizer, center_coef)


def save_reward_model(model, tokenizer, out_dir: Path, cfg: RunConfig | None = None) -> None:
    """A plain HF folder (LoRA merged into the base, the trained head under `score`), or for prompt /
    prefix tuning the PEFT adapter with its head."""
    offset = getattr(unwrap(model).config, REWARD_OFFSET, None)
    if is_peft_model(model) and not is_prompt_learning(model):
        if cfg is not None and cfg.method.type == "qlora":
            model = _merge_on_dequantized_base(model, tokenizer, cfg)
        else:
            model = model.merge_and_unload()  # the end of the run: merging in place is fine
    if offset is not None:
        setattr(unwrap(model).config, REWARD_OFFSET, offset)
        if is_prompt_learning(model):
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / REWARD_OFFSET_FILE).write_text(json.dumps({REWARD_OFFSET: offset}) + "\n")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _merge_on_dequantized_base(model, tokenizer, cfg: RunConfig):
    """Merging into 4-bit weights would round the update away: reload the base, de-quantise it to the
    NF4-rounded float weights the adapter trained on, and merge there."""
    from peft import PeftModel  # heavy: peft, ~3 s

    device = next(model.parameters()).device
    log.warning("QLoRA reward model: the 4-bit base is de-quantised to float before the adapter is merged")
    with tempfile.TemporaryDirectory(prefix="posttrain-qlora-rm-") as tmp:
        model.save_pretrained(tmp)
        base, _ = load_reward_model(cfg.model, device, tokenizer, quantization_config(cfg.methods, device))
        return PeftModel.from_pretrained(base.dequantize(), tmp).merge_and_unload()


def run(cfg: RunConfig) -> dict:
    dist_ctx, out_dir = start_run(cfg)

    model, tokenizer = load_reward_model(cfg.model, dist_ctx.device,
                                         quantization_config=quantization_config(cfg.methods, dist_ctx.device))
    data = build_preference_data(cfg.data, cfg.template, tokenizer, cfg.train.seed)
    if data.drops:
        log.warning("dropped preference rows: %s", ", ".join(f"{k}={v}" for k, v in sorted(data.drops.items())))
    prepared = prepare_model(model, cfg, task_type="SEQ_CLS")  # the head always trains
    model, trainable, total = prepared.model, prepared.trainable, prepared.total
    n_pairs = sum(len(sample.pairs) for sample in data.train)
    log.info("prompts: %d train (%d ranked pairs), %d eval; trainable parameters %d of %d", len(data.train),
             n_pairs, len(data.eval or []), trainable, total)

    pad_id = tokenizer.pad_token_id
    reference = None  # read now, so a bad rm.normalize_data file fails before training, not after
    if cfg.rm.normalize_data:
        reference = reference_ids(cfg.rm.normalize_data, tokenizer, cfg.data, cfg.template.system, Counter(),
                                  cfg.data.strict)
    loss_fn = functools.partial(rm_forward, center_coef=cfg.rm.center_coef)
    steps = DataSteps(preference_batches(data.train, pad_id), loss_fn, train=cfg.train, packing=cfg.data.packing,
                      max_length=cfg.data.max_length, dist_ctx=dist_ctx,
                      eval_data=preference_batches(data.eval, pad_id) if data.eval else None)
    loop = Loop(cfg, model, steps, dist_ctx=dist_ctx, param_groups=prepared.param_groups, on_step_start=prepared.hook)
    extra = {"stage": "rm", "method": cfg.method.type, "train_prompts": len(data.train), "train_pairs": n_pairs,
             "eval_prompts": len(data.eval or []), "rows_read": data.n_rows, "dropped": data.drops,
             "trainable_params": trainable, "total_params": total}

    def save(out: Path, trained) -> None:  # the loop calls this once, after the final eval and before the summary
        if reference is not None:  # InstructGPT's bias step: the reference responses now score 0 on average
            extra["reward_offset"] = fit_offset(trained, reference, pad_id, cfg.train.micro_batch_size,
                                                dist_ctx.device)
            log.info("reward_offset %.6f: mean raw reward of %d reference responses in %s", extra["reward_offset"],
                     len(reference), cfg.rm.normalize_data)
        save_reward_model(trained, tokenizer, out, cfg)

    return loop.run(save, extra_summary=extra)

