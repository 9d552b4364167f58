"""KTO stage, read top to bottom: config -> unpaired labelled data -> policy (+ reference) -> loop.

Each micro-batch holds B samples and their B mismatched sequences (a prompt with another sample's
response, data/kto.py), each set in one packed row where the model allows it (else right-padded rows).
The policy scores the samples with gradients; the mismatched sequences, under both policy and reference
and without gradients, give the KL reference point z_ref of that micro-batch (KTO's estimate, as TRL
computes it per batch). The reference is the model with its adapter off where that is the base (LoRA,
QLoRA, prompt / prefix), else a frozen copy taken before training.
"""

from __future__ import annotations

import copy
import functools
import logging
from contextlib import nullcontext

import torch

from posttrain.data.batches import kto_batches
from posttrain.data.kto import build_kto_data
from posttrain.losses.kto import kl_reference_point, kto_loss
from posttrain.models.anatomy import lm_head_and_backbone
from posttrain.models.forward import hidden_states, packs_rows, supervised_targets
from posttrain.models.head_logps import token_logps
from posttrain.models.load import load_base
from posttrain.models.methods import quantization_config
from posttrain.models.run import save_model
from posttrain.train.config import RunConfig
from posttrain.train.loop import Loop, start_run
from posttrain.train.reference_model import WithReference, policy_of, with_reference
from posttrain.train.setup import prepare_model
from posttrain.train.steps import DataSteps

log = logging.getLogger("posttrain")


def sequence_logps(model, batch: dict, chunk: int = 1024, fused: bool = True) -> torch.Tensor:
    """(sequences,) summed log-prob of each sequence's weighted (response) tokens. A sequence starts where
    its position ids restart at 0: a padded row holds one, a packed row several."""
    _, head = lm_head_and_backbone(model)
    hidden = hidden_states(model, batch, fused)  # (rows, T, H)
    index, targets, _ = supervised_targets(batch)  # (N, 2) positions predicting a response token
    flat = token_logps(head, hidden[index[:, 0], index[:, 1]], targets, chunk, fused)  # (N,)
    starts = batch["position_ids"] == 0  # (rows, T)
    seq = (starts.flatten().cumsum(0) - 1).view_as(starts)[index[:, 0], index[:, 1] + 1]  # (N,) the target's
    return hidden.new_zeros(int(starts.sum()), dtype=torch.float32).index_add(0, seq, flat)


def kto_forward(model, batch: dict, normalizer: float, *, kto_cfg, chunk: int = 1024,
                fused: bool = True) -> tuple[torch.Tensor, dict]:
    """KTO loss of one micro-batch: the B samples (input_ids, ...) and their mismatched sequences (kl_*). `model`
    is the policy (reference = adapter off) or a WithReference holding the frozen copy."""
    model, ref_model = (model.policy, model.reference) if isinstance(model, WithReference) else (model, None)
    n = int(batch["desirable"].shape[0])
    samples = {k: v for k, v in batch.items() if k != "desirable" and not k.startswith("kl_")}
    mismatched = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
    policy = sequence_logps(model, samples, chunk, fused)  # (B,)
    with torch.no_grad():
        kl_policy = sequence_logps(model, mismatched, chunk, fused)
        reference = ref_model if ref_model is not None else model
        with model.disable_adapter() if ref_model is None else nullcontext():
            ref = sequence_logps(reference, samples, chunk, fused)
            kl_ref = sequence_logps(reference, mismatched, chunk, fused)
    z = kl_reference_point(kl_policy, kl_ref)
    loss, metrics = kto_loss(policy, ref, batch["desirable"], z, normalizer, beta=kto_cfg.beta,
                             desirable_weight=kto_cfg.desirable_weight, undesirable_weight=kto_cfg.undesirable_weight)
    return loss, metrics | {"tokens": float(n)}  # the unit count: held-out loss is a mean over samples


def run(cfg: RunConfig) -> dict:
    dist_ctx, out_dir = start_run(cfg)
    model, tokenizer = load_base(cfg.model, dist_ctx.device, quantization_config(cfg.methods, dist_ctx.device))
    data = build_kto_data(cfg.data, cfg.template, tokenizer, cfg.train.seed)
    if data.drops:
        log.warning("dropped KTO rows: %s", ", ".join(f"{k}={v}" for k, v in sorted(data.drops.items())))
    adapter_reference = cfg.methods.adapter_off_is_base()
    ref_model = None if adapter_reference else copy.deepcopy(model).eval().requires_grad_(False)
    prepared = prepare_model(model, cfg)
    model, trainable, total = prepared.model, prepared.trainable, prepared.total
    desirable = sum(s.desirable for s in data.train)
    log.info("samples: %d train (%d desirable), %d eval; reference %s; trainable parameters %d of %d",
             len(data.train), desirable, len(data.eval or []), "adapter off" if adapter_reference else "copy",
             trainable, total)

    loss_fn = functools.partial(kto_forward, kto_cfg=cfg.kto, chunk=cfg.train.loss_chunk)
    pad_id, pack = tokenizer.pad_token_id, packs_rows(cfg)
    steps = DataSteps(kto_batches(data.train, pad_id, pack), loss_fn, train=cfg.train, packing=False,
                      max_length=cfg.data.max_length, dist_ctx=dist_ctx,
                      eval_data=kto_batches(data.eval, pad_id, pack) if data.eval else None)
    loop = Loop(cfg, with_reference(model, ref_model), steps, dist_ctx=dist_ctx, param_groups=prepared.param_groups,
                on_step_start=prepared.hook)
    extra = {"stage": "kto", "method": cfg.method.type, "packed": pack,
             "reference": "adapter" if adapter_reference else "copy",
             "train_samples": len(data.train), "desirable": desirable, "eval_samples": len(data.eval or []),
             "dropped": data.drops, "trainable_params": trainable, "total_params": total}
    return loop.run(lambda out, trained: save_model(policy_of(trained), tokenizer, out), extra_summary=extra)
