"""Reward-model stage, read top to bottom: config -> preference data -> causal LM + scalar head -> loop.

The model is transformers' own `*ForSequenceClassification` (num_labels=1): a linear `score` head
on the last non-pad token. The run folder is saved as a plain HF sequence-classification model
(LoRA merged in; a QLoRA base de-quantised first), so `posttrain score`, the PPO stage and plain
transformers all load it. Prompt / prefix tuning cannot be merged: those runs save a PEFT adapter
(virtual tokens + head) that `load_reward_model` puts back on its base. With `rm.normalize_data`, a
reward offset is stored too (see train/reward_scoring.py).
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from pathlib import Path

import torch

from posttrain.config import RunConfig
from posttrain.data.preference import PrefSample, build_preference_data, collate_preferences
from posttrain.losses import pairwise_reward_loss
from posttrain.models.load import REWARD_OFFSET, REWARD_OFFSET_FILE, load_reward_model
from posttrain.models.methods import (apply_method, count_parameters, is_prompt_learning, optimizer_groups,
                                      quantization_config, step_hook, unwrap)
from posttrain.train.loop import Loop, start_run
from posttrain.train.steps import Batches, DataSteps
from posttrain.train.reward_scoring import fit_offset, reference_ids

log = logging.getLogger("posttrain")


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


def to_batches(samples: list[PrefSample], pad_id: int, pack: bool = False, share_prompt: bool = False) -> Batches:
    """One unit per prompt; loss_tokens=1 makes the loop's normaliser the prompt count.

    pack / share_prompt: see collate_preferences (DPO; a reward model reads one row per sequence)."""
    return Batches(lengths=[max(len(x) for x in s.input_ids) for s in samples], loss_tokens=[1] * len(samples),
                   collate=functools.partial(collate_preferences, samples=samples, pad_id=pad_id, pack=pack,
                                             share_prompt=share_prompt))


def save_reward_model(model, tokenizer, out_dir: Path, cfg: RunConfig | None = None) -> None:
    """A plain HF folder (LoRA merged into the base, the trained head under `score`), or for prompt /
    prefix tuning the PEFT adapter with its head."""
    from posttrain.models.run import is_peft_model

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
    reference = None  # read now, so a bad rm.normalize_data file fails before training, not after
    if cfg.rm.normalize_data:
        reference = reference_ids(cfg.rm.normalize_data, tokenizer, cfg, Counter())
    steps = DataSteps(to_batches(data.train, pad_id), functools.partial(rm_forward, center_coef=cfg.rm.center_coef),
                      train=cfg.train, packing=cfg.data.packing, max_length=cfg.data.max_length, dist_ctx=dist_ctx,
                      eval_data=to_batches(data.eval, pad_id) if data.eval else None)
    loop = Loop(cfg, model, steps, dist_ctx=dist_ctx, param_groups=optimizer_groups(model, cfg), on_step_start=hook)
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

