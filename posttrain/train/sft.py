"""Supervised fine-tuning, read top to bottom: config -> data -> model -> loop with the SFT loss."""

from __future__ import annotations

import functools
import logging


from posttrain.train.config import RunConfig
from posttrain.data.batches import sft_batches
from posttrain.data.pipeline import build_sft_data
from posttrain.models.load import load_base
from posttrain.models.methods import quantization_config
from posttrain.models.run import save_model
from posttrain.models.forward import FastPaths, sft_forward
from posttrain.train.loop import Loop, start_run
from posttrain.train.setup import prepare_model
from posttrain.train.steps import DataSteps

log = logging.getLogger("posttrain")



def run(cfg: RunConfig, fast: FastPaths = FastPaths()) -> dict:
    dist_ctx, out_dir = start_run(cfg)

    model, tokenizer = load_base(cfg.model, dist_ctx.device, quantization_config(cfg.methods, dist_ctx.device))
    data = build_sft_data(cfg.data, cfg.template, tokenizer, cfg.train.seed)
    if data.drops:
        log.warning("dropped samples by reason: %s", ", ".join(f"{k}={v}" for k, v in sorted(data.drops.items())))
    prepared = prepare_model(model, cfg, fused=fast.fused)
    model, trainable, total = prepared.model, prepared.trainable, prepared.total
    log.info("samples: %d train, %d eval; trainable parameters %d of %d (%.2f%%)", len(data.train),
             len(data.eval) if data.eval is not None else 0, trainable, total, 100 * trainable / total)

    pad_id = tokenizer.pad_token_id
    loss_fn = functools.partial(sft_forward, chunk=cfg.train.loss_chunk, head_positions=fast.head_positions,
                                fused=fast.fused)
    steps = DataSteps(sft_batches(data.train, pad_id), loss_fn, train=cfg.train, packing=cfg.data.packing,
                      max_length=cfg.data.max_length, dist_ctx=dist_ctx,
                      eval_data=sft_batches(data.eval, pad_id) if data.eval is not None and len(data.eval) else None)
    loop = Loop(cfg, model, steps, dist_ctx=dist_ctx, param_groups=prepared.param_groups, on_step_start=prepared.hook)
    extra = {"stage": "sft", "method": cfg.method.type, "train_samples": len(data.train),
             "eval_samples": len(data.eval) if data.eval is not None else 0, "rows_read": data.n_rows,
             "dropped": data.drops, "trainable_params": trainable, "total_params": total}
    return loop.run(lambda out, trained: save_model(trained, tokenizer, out), extra_summary=extra)
