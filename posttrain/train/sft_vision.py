"""Supervised fine-tuning of a vision-language model (LLaVA), read top to bottom.

config -> LLaVA model (assembled from model + vision.tower, or a LLaVA folder) -> data with images ->
which weights train (method.type, vision.freeze_tower) -> frozen-tower features computed once and cached
-> the loop with the SFT loss. `stage: sft` comes here (cli picks it) whenever the run has a vision model.
"""

from __future__ import annotations

import functools
import logging

from posttrain.train.config import RunConfig
from posttrain.data.batches import vision_sft_batches
from posttrain.data.images import load_image
from posttrain.data.pipeline import build_sft_data
from posttrain.models.methods import count_parameters
from posttrain.models.run import save_model
from posttrain.models.vision_features import FeatureCache
from posttrain.models.vision_forward import vision_sft_forward
from posttrain.models.vision_load import load_vision_model, save_processor
from posttrain.models.vision_methods import apply_vision_method
from posttrain.train.loop import Loop, start_run
from posttrain.train.steps import DataSteps

log = logging.getLogger("posttrain")


def image_source(model, inputs, datasets: list, cfg: RunConfig):
    """refs -> batch tensors: cached features of a frozen tower, else pixels for the tower to run on."""
    if cfg.vision.freeze_tower:
        refs = [ref for ds in datasets if ds is not None for refs in ds["images"] for ref in refs]
        cache = FeatureCache(model, inputs, refs, use_disk=cfg.vision.cache_features)
        return lambda batch_refs: {"image_features": cache.lookup(batch_refs)}
    return lambda batch_refs: {"pixel_values": inputs.pixel_values([load_image(r, "image") for r in batch_refs])
                               if batch_refs else inputs.pixel_values([]).new_zeros(0)}


def run(cfg: RunConfig) -> dict:
    dist_ctx, out_dir = start_run(cfg)

    model, tokenizer, inputs = load_vision_model(cfg.model, cfg.vision, dist_ctx.device, seed=cfg.train.seed)
    data = build_sft_data(cfg.data, cfg.template, tokenizer, cfg.train.seed, images=True)
    if data.drops:
        log.warning("dropped samples by reason: %s", ", ".join(f"{k}={v}" for k, v in sorted(data.drops.items())))
    model = apply_vision_method(model, cfg.methods, cfg.vision)
    trainable, total = count_parameters(model)
    n_images = sum(len(refs) for refs in data.train["images"])
    log.info("samples: %d train (%d images, %d tokens each), %d eval; trainable parameters %d of %d (%.2f%%)",
             len(data.train), n_images, inputs.tokens_per_image, len(data.eval) if data.eval is not None else 0,
             trainable, total, 100 * trainable / total)

    images = image_source(model, inputs, [data.train, data.eval], cfg)
    pad_id = tokenizer.pad_token_id
    loss_fn = functools.partial(vision_sft_forward, chunk=cfg.train.loss_chunk)
    eval_data = vision_sft_batches(data.eval, pad_id, images) if data.eval is not None and len(data.eval) else None
    steps = DataSteps(vision_sft_batches(data.train, pad_id, images), loss_fn, train=cfg.train,
                      packing=cfg.data.packing, max_length=cfg.data.max_length, dist_ctx=dist_ctx,
                      eval_data=eval_data)
    params = [p for p in model.parameters() if p.requires_grad]
    loop = Loop(cfg, model, steps, dist_ctx=dist_ctx, param_groups=[{"params": params}])
    extra = {"stage": "sft", "method": cfg.method.type, "vision_tower": cfg.vision.tower or cfg.model.name_or_path,
             "train_samples": len(data.train), "train_images": n_images, "tokens_per_image": inputs.tokens_per_image,
             "eval_samples": len(data.eval) if data.eval is not None else 0, "rows_read": data.n_rows,
             "dropped": data.drops, "trainable_params": trainable, "total_params": total}

    def save(folder, trained) -> None:
        save_model(trained, tokenizer, folder)
        save_processor(trained, tokenizer, folder)

    return loop.run(save, extra_summary=extra)
