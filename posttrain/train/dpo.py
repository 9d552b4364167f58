"""DPO-family stage, read top to bottom: config -> preference data -> policy (+ reference) -> loop.

Chosen and rejected responses of a micro-batch go through the policy in one forward pass: packed
into one row where attention keeps them apart (no padding), the responses of a prompt sharing one
copy of its prompt tokens; the LM head runs only at response positions. The reference is the model
with its adapter off (LoRA, QLoRA, prompt / prefix tuning), a frozen copy, or log-probs precomputed
once before training (no second model in memory; the default for full, freeze, LISA and PiSSA, which
change the base) and cached on disk, so the next run on the same data and model loads them
(train/reference_cache.py).
"""

from __future__ import annotations

import copy
import functools
import logging
from contextlib import nullcontext

import torch

from posttrain.train.config import RunConfig
from posttrain.data.batches import preference_batches
from posttrain.data.preference import PrefSample, build_preference_data
from posttrain.losses import REFERENCE_FREE, PairLogps, preference_loss
from posttrain.models.load import load_base
from posttrain.models.anatomy import lm_head_and_backbone
from posttrain.models.methods import quantization_config
from posttrain.models.run import save_model
from posttrain.models.forward import FastPaths, hidden_states, packs_rows
from posttrain.models.head_logps import token_logps
from posttrain.train.loop import Dist, Loop, start_run
from posttrain.train.setup import prepare_model
from posttrain.train.steps import DataSteps
from posttrain.train import reference_cache
from posttrain.train.reference_model import WithReference, policy_of, with_reference

log = logging.getLogger("posttrain")


def response_logps(model, batch: dict, chunk: int = 1024, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) summed log-prob of each sequence's response tokens, and (R,) their counts (rows may be packed)."""
    _, head = lm_head_and_backbone(model)
    hidden = hidden_states(model, batch, fused, shared_prefix=bool(batch.get("shared_prompt", False)))  # (B, T, H)
    selected = hidden[batch["target_row"], batch["target_pos"]]  # (N, H) the positions that predict the targets
    flat = token_logps(head, selected, batch["target_ids"], chunk, fused)  # (N,)
    sequence, n = batch["target_seq"], int(batch["n_samples"])  # (N,) which sequence each target belongs to
    logps = hidden.new_zeros(n, dtype=torch.float32).index_add(0, sequence, flat)
    lengths = torch.bincount(sequence, minlength=n).float()
    return logps, lengths


def dpo_forward(model, batch: dict, normalizer: float, *, dpo_cfg, chunk: int = 1024, fused: bool = True):
    """Policy (and reference) log-probs of every response -> the chosen loss over the batch's pairs. `model` is
    the policy, or a WithReference; the reference is otherwise precomputed (batch["ref_logps"]) or the policy
    with its adapter off."""
    policy, ref_model = (model.policy, model.reference) if isinstance(model, WithReference) else (model, None)
    logps, lengths = response_logps(policy, batch, chunk, fused)
    better, worse = batch["pair_better"], batch["pair_worse"]
    ref = None
    if dpo_cfg.loss not in REFERENCE_FREE:
        ref = batch.get("ref_logps")
        if ref is None:
            with torch.no_grad(), (policy.disable_adapter() if ref_model is None else nullcontext()):
                ref = response_logps(ref_model if ref_model is not None else policy, batch, chunk, fused)[0]
    lp = PairLogps(logps[better], logps[worse], None if ref is None else ref[better],
                   None if ref is None else ref[worse], lengths[better], lengths[worse])
    return preference_loss(dpo_cfg.loss, lp, batch["pair_weight"], normalizer, beta=dpo_cfg.beta,
                           label_smoothing=dpo_cfg.label_smoothing, gamma=dpo_cfg.gamma,
                           sft_weight=dpo_cfg.sft_weight)


@torch.no_grad()
def precompute_reference(model, samples: list[PrefSample], pad_id: int, micro: int, device, chunk: int,
                         pack: bool = False, dist_ctx: Dist | None = None) -> None:
    """Store each response's reference log-prob on its sample (run before any training step, on the whole
    model). Over several processes each computes every world-th micro-batch (the batches one process would
    make, so the numbers are the same) and all of them receive every result."""
    dist_ctx = dist_ctx or Dist()
    was_training = model.training
    model.eval()
    batches = preference_batches(samples, pad_id, pack, share_prompt=pack)
    starts = range(0, len(samples), micro)
    mine: dict[int, list[float]] = {}
    for start in starts[dist_ctx.rank::dist_ctx.world]:
        units = [[i] for i in range(start, min(start + micro, len(samples)))]
        batch = {k: v.to(device) for k, v in batches.collate(units).items()}
        mine[start] = response_logps(model, batch, chunk, fused=pack)[0].tolist()
    for part in dist_ctx.gather(mine):
        for start, logps in part.items():
            for i in range(start, min(start + micro, len(samples))):
                k = len(samples[i].input_ids)
                samples[i].ref_logps, logps = logps[:k], logps[k:]
    model.train(was_training)


def reference_from_cache(model, samples: list[PrefSample], cfg: RunConfig, pad_id: int, dist_ctx: Dist,
                         pack: bool) -> str:
    """Precompute the samples' reference log-probs, or load them from the disk cache; says which happened.
    `pack`: packed and padded rows round differently, so the cache key names the layout. Over several
    processes: loaded only where every process found the file (nodes need not share a disk), computed in shares
    otherwise, written by the main process."""
    if not samples:
        return "none"
    device = dist_ctx.device
    path = reference_cache.cache_file(samples, model, cfg.model, device, pack) if cfg.dpo.reference_cache else None
    found = path is not None and reference_cache.load_reference(path, samples)
    if dist_ctx.sum([float(found)])[0] == dist_ctx.world:
        log.info("reference log-probs of %d prompts loaded from %s", len(samples), path)
        return "loaded"
    precompute_reference(model, samples, pad_id, cfg.train.micro_batch_size, device, cfg.train.loss_chunk, pack,
                         dist_ctx)
    if path is not None and dist_ctx.main:
        reference_cache.save_reference(path, samples)
        log.info("reference log-probs of %d prompts computed and cached in %s", len(samples), path)
    return "computed"


def reference_mode(cfg: RunConfig) -> str:
    if cfg.dpo.loss in REFERENCE_FREE:
        return "none"
    if cfg.dpo.reference == "auto":
        return "adapter" if cfg.methods.adapter_off_is_base() else "precompute"
    return cfg.dpo.reference


def run(cfg: RunConfig, fast: FastPaths = FastPaths()) -> dict:
    dist_ctx, out_dir = start_run(cfg)

    model, tokenizer = load_base(cfg.model, dist_ctx.device, quantization_config(cfg.methods, dist_ctx.device))
    data = build_preference_data(cfg.data, cfg.template, tokenizer, cfg.train.seed)
    if data.drops:
        log.warning("dropped preference rows: %s", ", ".join(f"{k}={v}" for k, v in sorted(data.drops.items())))
    mode, pad_id, chunk = reference_mode(cfg), tokenizer.pad_token_id, cfg.train.loss_chunk
    pack = packs_rows(cfg, fast.fused)
    ref_model, cached = None, {}
    if mode == "copy":
        ref_model = copy.deepcopy(model)
    elif mode == "precompute":  # before training, the policy is the reference
        cached = {split: reference_from_cache(model, samples, cfg, pad_id, dist_ctx, pack)
                  for split, samples in (("train", data.train), ("eval", data.eval or []))}
    prepared = prepare_model(model, cfg, fused=fast.fused)
    model, trainable, total = prepared.model, prepared.trainable, prepared.total
    log.info("prompts: %d train, %d eval; loss %s, reference %s; trainable parameters %d of %d",
             len(data.train), len(data.eval or []), cfg.dpo.loss, mode, trainable, total)

    loss_fn = functools.partial(dpo_forward, dpo_cfg=cfg.dpo, chunk=chunk, fused=fast.fused)
    trained = with_reference(model, ref_model)
    steps = DataSteps(preference_batches(data.train, pad_id, pack, share_prompt=pack), loss_fn, train=cfg.train,
                      packing=cfg.data.packing, max_length=cfg.data.max_length, dist_ctx=dist_ctx,
                      eval_data=preference_batches(data.eval, pad_id, pack, share_prompt=pack) if data.eval else None)
    loop = Loop(cfg, trained, steps, dist_ctx=dist_ctx, param_groups=prepared.param_groups,
                on_step_start=prepared.hook)
    extra = {"stage": "dpo", "loss": cfg.dpo.loss, "reference": mode, "method": cfg.method.type,
             "train_prompts": len(data.train), "eval_prompts": len(data.eval or []), "rows_read": data.n_rows,
             "dropped": data.drops, "trainable_params": trainable, "total_params": total,
             "reference_logps": cached}
    return loop.run(lambda out, done: save_model(policy_of(done), tokenizer, out),
                    extra_summary=extra)
