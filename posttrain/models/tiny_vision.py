"""`tiny-random-vision` and `tiny-random-vlm`: random vision models for tests, built offline in about a second.

tiny-random-vision is a 2-layer DINOv2 (hidden 32) seeing a 32 px image as 4 x 4 patches of 8 px;
tiny-random-vlm joins it to tiny-random through an MLP projector as one LLaVA folder (with processor).
"""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.models.dinov2_onnx import image_processor
from posttrain.models.vision import assemble_llava, llava_processor, load_tower

TINY_IMAGE_SIZE = 32
TINY_PATCH = 8


def build_tiny_vision(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random Dinov2Model folder with its image processor."""
    from transformers import Dinov2Config, Dinov2Model  # heavy: transformers, ~3 s

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=TINY_PATCH, image_size=TINY_IMAGE_SIZE)
    torch.manual_seed(seed)
    model = Dinov2Model(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    image_processor(TINY_IMAGE_SIZE).save_pretrained(out_dir)
    return out_dir


def build_tiny_vlm(out_dir: str | Path, llm_path: str, tower_path: str, seed: int = 0) -> Path:
    """Write a LLaVA folder: tiny-random + tiny-random-vision + a seeded mlp2x_gelu projector."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer  # heavy: transformers, ~3 s

    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llm_path)  # not models.load: it imports sources, which builds this
    tower = load_tower(tower_path, torch.float32)
    model = assemble_llava(llm, tokenizer, tower, projector="mlp2x_gelu", seed=seed)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    llava_processor(tokenizer, AutoImageProcessor.from_pretrained(tower_path), model).save_pretrained(out_dir)
    return out_dir
