"""Perplexity / LM loss on held-out data, through the training pipeline, masks and loss.

The file is read, rendered and masked by `build_sft_data` (the same template, mask mode and
max_length as a training run), batched by `collate`, and scored by `sft_forward`: the number
reported is exactly the eval loss a training run would log on that file.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from posttrain.data.config import DataConfig, DatasetConfig
from posttrain.templates.config import TemplateConfig
from posttrain.eval.progress import Progress
from posttrain.data.collate import collate
from posttrain.data.pipeline import build_sft_data
from posttrain.models.forward import sft_forward
from posttrain.models.run import load_model_for_inference


@torch.no_grad()
def perplexity(model, tokenizer, data_cfg: DataConfig, template_cfg: TemplateConfig, *,
               batch_size: int = 8, seed: int = 42) -> dict:
    """Token-level mean NLL over supervised tokens and its exp (perplexity) for data_cfg.datasets."""
    data = build_sft_data(dataclasses.replace(data_cfg, val_size=0.0, eval_datasets=[]), template_cfg,
                          tokenizer, seed)
    ids, weights = data.train["input_ids"], data.train["weights"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths pad less
    nll_sum = tokens = 0.0
    start = time.time()
    with Progress(len(order), "perplexity", "sample") as progress:
        for k in range(0, len(order), batch_size):
            batch = collate([[i] for i in order[k:k + batch_size]], ids, weights, pad_id)
            batch = {name: t.to(device) for name, t in batch.items()}
            # normalizer 1: the loss is the weighted sum; the unweighted NLL sum comes back in metrics
            _, metrics = sft_forward(model, batch, normalizer=1.0)
            nll_sum += metrics["nll_sum"]
            tokens += metrics["tokens"]
            progress.update(len(order[k:k + batch_size]))
    mean = nll_sum / max(tokens, 1.0)
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": int(tokens), "samples": len(ids),
            "dropped": data.drops, "seconds": round(time.time() - start, 1)}


def run_file(model_ref: str, path: str, *, mask: str = "all", max_length: int = 1024, template: str = "auto",
             system: str | None = None, batch_size: int = 8, device: str | None = None) -> dict:
    """Load any model reference and score one data file; a run's own template settings win by default."""
    model, tokenizer, cfg = load_model_for_inference(model_ref, device=device)
    template_cfg = TemplateConfig(name=template, system=system)
    if cfg is not None and template == "auto" and system is None:
        template_cfg = cfg.template  # score with the template the run trained on
    data_cfg = DataConfig(datasets=[DatasetConfig(path=path)], mask=mask, max_length=max_length)
    return perplexity(model, tokenizer, data_cfg, template_cfg, batch_size=batch_size)
