"""Frozen-tower features cached with the tokenized data (models/vision_features.py), on the tiny LLaVA: the loss
and the projector's gradients from cached features equal those from running the tower on the pixels; training
steps on cached features never run the tower; the disk cache gives back the same table without running it,
and a changed image is computed again."""

import json
import os

import pytest
import torch

from posttrain.data.batches import vision_sft_batches
from posttrain.data.pipeline import build_sft_data
from posttrain.models.config import ModelConfig
from posttrain.models.vision_config import VisionConfig
from posttrain.models.vision_features import FeatureCache
from posttrain.models.vision_forward import vision_sft_forward
from posttrain.models.vision_load import load_vision_model
from posttrain.models.vision_methods import apply_vision_method
from posttrain.train.config import load_config
from posttrain.train.sft_vision import image_source

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Four colour images; rows with one image and one with two (packed rows mix both)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(root / f"{name}.png")
        rows.append({"messages": [{"role": "user", "content": "<image>What colour is this?"},
                                  {"role": "assistant", "content": f"It is {name}."}], "images": [f"{name}.png"]})
    rows.append({"messages": [{"role": "user", "content": "<image><image>Same colour?"},
                              {"role": "assistant", "content": "No."}], "images": ["red.png", "blue.png"]})
    (root / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _setup(tiny_vlm_dir, colours, freeze_tower: bool):
    cfg = load_config(None, [], **{
        "model.name_or_path": str(tiny_vlm_dir), "method.type": "projector", "train.device": "cpu",
        "data.max_length": 64, "data.datasets": [{"path": str(colours / "colours.jsonl")}],
        "vision.freeze_tower": freeze_tower, "vision.cache_features": False})
    model, tokenizer, inputs = load_vision_model(cfg.model, cfg.vision, "cpu")
    data = build_sft_data(cfg.data, cfg.template, tokenizer, 0, images=True)
    model = apply_vision_method(model, cfg.methods, cfg.vision)
    return model, vision_sft_batches(data.train, tokenizer.pad_token_id, image_source(model, inputs, [data.train], cfg))


def _loss_and_grads(model, batches, units):
    model.zero_grad()
    batch = batches.collate(units)
    loss, _ = vision_sft_forward(model, batch, normalizer=10.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, batch


def test_cached_features_give_the_loss_and_gradients_of_the_tower(tiny_vlm_dir, colours):
    units = [[0, 1], [2], [3, 4]]  # packed rows, one with a two-image sample
    cached_model, cached = _setup(tiny_vlm_dir, colours, freeze_tower=True)
    pixel_model, pixels = _setup(tiny_vlm_dir, colours, freeze_tower=False)
    for p in pixel_model.model.vision_tower.parameters():  # the same frozen tower, run every step
        p.requires_grad_(False)
    calls = []
    cached_model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    loss_c, grads_c, batch_c = _loss_and_grads(cached_model, cached, units)
    loss_p, grads_p, batch_p = _loss_and_grads(pixel_model, pixels, units)
    assert "image_features" in batch_c and "pixel_values" in batch_p
    assert batch_c["image_features"].shape[0] == batch_p["pixel_values"].shape[0] == 6  # images in token order
    assert not calls  # a step on cached features never runs the tower
    assert abs(loss_c.item() - loss_p.item()) < 1e-6 and loss_c.item() > 0
    assert grads_c.keys() == grads_p.keys() and grads_c
    for name in grads_c:
        assert torch.allclose(grads_c[name], grads_p[name], atol=1e-6), name


def test_disk_cache_reuses_features_and_recomputes_changed_images(tiny_vlm_dir, colours, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    model, _, inputs = load_vision_model(ModelConfig(name_or_path=str(tiny_vlm_dir)), VisionConfig(), "cpu")
    refs = [str(colours / f"{c}.png") for c in COLOURS]
    first = FeatureCache(model, inputs, refs)
    files = list((tmp_path / "cache" / "vision_features").rglob("*.safetensors"))
    assert len(files) == len(COLOURS)
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    again = FeatureCache(model, inputs, refs)
    assert not calls and torch.equal(again.table, first.table)
    changed = tmp_path / "red.png"  # same path, new content and mtime: computed again
    Image.new("RGB", (40, 40), (220, 30, 30)).save(changed)
    before = FeatureCache(model, inputs, [str(changed)]).table
    Image.new("RGB", (40, 40), (30, 30, 220)).save(changed)
    os.utime(changed, ns=(os.stat(changed).st_mtime_ns + 10**9,) * 2)
    after = FeatureCache(model, inputs, [str(changed)]).table
    assert torch.allclose(after, first.lookup([refs[1]]), atol=1e-6) and not torch.allclose(after, before)
