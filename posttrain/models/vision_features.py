"""Vision-tower features: computed once per image for a frozen tower, cached on disk, reused by every epoch.

A frozen tower gives an image the same features every step, so training runs it once per distinct
image before the first step and then only the projector and the LLM. Features land in
`$POSTTRAIN_CACHE/vision_features/<tower key>/<image key>.safetensors`; the tower key hashes the
tower's weights, the feature layer, the CLS rule and the image processor's settings, the image key the
file's path, size and mtime (or a data URL's content), so a changed image or tower never reuses stale ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from posttrain.data.images import image_key, load_image
from posttrain.models.anatomy import unwrap
from posttrain.models.sources import cache_dir

log = logging.getLogger(__name__)


def select_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, T, D_vision): the tower's hidden layer the projector reads, CLS dropped as the config says
    (LlavaModel.get_image_features without the projector)."""
    llava = unwrap(model)
    config = llava.config
    tower = llava.model.vision_tower
    out = tower(pixel_values.to(next(tower.parameters()).dtype), output_hidden_states=True, return_dict=True)
    features = out.hidden_states[config.vision_feature_layer]
    return features[:, 1:] if config.vision_feature_select_strategy == "default" else features


def tower_key(model: nn.Module, processor) -> str:
    """A hash of what shapes a feature: the tower's weights, the layer and CLS rule, the image processing."""
    llava = unwrap(model)
    digest = hashlib.sha256()
    for name, tensor in sorted(llava.model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    settings = {"layer": llava.config.vision_feature_layer, "strategy": llava.config.vision_feature_select_strategy,
                "processor": processor.to_dict()}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


class FeatureCache:
    """Frozen-tower features for a set of images: `table` (N, T, D) in memory, `index` ref -> row."""

    def __init__(self, model: nn.Module, inputs, refs: list[str], *, use_disk: bool = True, batch_size: int = 16):
        self.index = {ref: i for i, ref in enumerate(dict.fromkeys(refs))}
        folder = cache_dir() / "vision_features" / tower_key(model, inputs.processor) if use_disk else None
        rows, todo = [None] * len(self.index), []
        for ref, i in self.index.items():
            file = folder / (hashlib.sha256(image_key(ref).encode()).hexdigest()[:32] + ".safetensors") \
                if folder else None
            if file is not None and file.is_file():
                rows[i] = _load(file)
            else:
                todo.append((ref, i, file))
        if todo:
            log.info("vision features: computing %d of %d images (%d cached)", len(todo), len(rows),
                     len(rows) - len(todo))
        self._compute(model, inputs, todo, rows, batch_size)
        self.table = torch.stack(rows) if rows else torch.zeros(0)  # (N, T, D)

    @torch.no_grad()
    def _compute(self, model, inputs, todo: list, rows: list, batch_size: int) -> None:
        device = next(unwrap(model).model.vision_tower.parameters()).device
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            pixels = inputs.pixel_values([load_image(ref, "image") for ref, _, _ in chunk]).to(device)
            feats = select_features(model, pixels).float().cpu()
            for (_, i, file), feat in zip(chunk, feats):
                rows[i] = feat.clone()
                if file is not None:
                    _save(file, rows[i])

    def lookup(self, refs: list[str]) -> torch.Tensor:
        """(len(refs), T, D) features in the given order."""
        if not refs:
            return self.table[:0]
        return self.table[torch.tensor([self.index[r] for r in refs])]


def _load(file: Path) -> torch.Tensor:
    return load_file(str(file))["features"]


def _save(file: Path, tensor: torch.Tensor) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    save_file({"features": tensor.contiguous()}, str(tmp))
    tmp.replace(file)  # atomic: a crash never leaves a half-written feature file behind
