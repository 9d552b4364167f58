"""The `vision:` config section: a vision tower and projector that turn `model.name_or_path` into a LLaVA model.

With `vision.tower` set, the LLM named by `model.name_or_path` and the tower are assembled into a native
transformers `LlavaForConditionalGeneration` (projector between them, `<image>` token added to the
tokenizer). A `model.name_or_path` that is already a LLaVA folder needs no `vision.tower`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from posttrain.errors import ConfigError
from posttrain.typed_config import opt

# method.type values that work with a vision model (virtual tokens and LISA do not know about image tokens;
# a 4-bit base would quantise the tower and projector too).
VISION_METHODS = ("projector", "lora", "full", "freeze")


@dataclass
class VisionConfig:
    tower: str = opt(
        "", "vision encoder: built-in dinov2-small or tiny-random-vision, or an HF CLIP / SigLIP / DINOv2 folder; "
        "'' = none (text-only, unless model.name_or_path is a LLaVA folder)")
    projector: Literal["mlp2x_gelu", "linear"] = opt(
        "mlp2x_gelu", "projector from tower features to the LLM's embeddings: mlp2x_gelu (LLaVA-1.5) or linear")
    image_tokens: int = opt(
        0, "tokens per image: 0 = the tower's full patch grid at its own image size; N (a square, e.g. 64) = images "
        "resized so the tower's grid is sqrt(N) x sqrt(N) (fewer tokens, faster; needs a tower that interpolates "
        "its position embeddings, like DINOv2)")
    feature_layer: int = opt(-1, "tower hidden layer fed to the projector (-1 = last, -2 = LLaVA's choice)")
    freeze_tower: bool = opt(
        True, "keep the tower frozen (its features are then computed once and cached with the tokenized data); "
        "false trains it in full with the other trained weights")
    cache_features: bool = opt(True, "frozen tower: cache its features per image (in $POSTTRAIN_CACHE/vision_features)")


def validate_vision(vision: VisionConfig, method_type: str) -> None:
    """Rules for the vision section; called from config.validate for every training stage (whether the model
    has a vision tower at all is checked when it loads: a LLaVA folder needs no vision.tower)."""
    n = vision.image_tokens
    if n < 0 or (n and math.isqrt(n) ** 2 != n):
        raise ConfigError(f"vision.image_tokens must be 0 (full grid) or a square number (16, 64, 256), got {n}")
    if vision.tower and method_type not in VISION_METHODS:
        raise ConfigError(f"method.type={method_type} is not supported with a vision tower; use one of "
                          f"{', '.join(VISION_METHODS)}")
