"""Vision-language models: a vision tower + projector + LLM assembled into a native transformers LLaVA.

`assemble_llava` builds `LlavaForConditionalGeneration` from any causal LM and any HF vision tower
(CLIP, SigLIP, DINOv2; built-ins dinov2-small and tiny-random-vision): the tokenizer gains an `<image>`
token, the LLM's embeddings one row for it (the mean row: deterministic, so a LoRA run's base is rebuilt
bit for bit), and the projector is `linear_1 -> act -> linear_2` with act GELU (mlp2x_gelu) or identity
(linear: the product of two linear maps is one). Saved with a `LlavaProcessor`, the folder loads in plain
transformers (`AutoModelForImageTextToText`, `AutoProcessor`) and in every posttrain command.
Image tokens per image follow the image size given to the tower: pooled grids are smaller images.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from torch import nn

from posttrain.errors import ConfigError, ModelSourceError
from posttrain.models.anatomy import unwrap
from posttrain.records import IMAGE_PLACEHOLDER as IMAGE_TOKEN
from posttrain.models.dinov2_onnx import image_processor

log = logging.getLogger(__name__)

VLM_MODEL_TYPES = ("llava",)
_HAS_CLS = ("dinov2", "clip_vision_model", "clip")  # towers whose first output token is a CLS token
_PROJECTOR_ACT = {"mlp2x_gelu": "gelu", "linear": "linear"}


def model_type_of(path: str | Path) -> str | None:
    """config.json's model_type of a local folder (None for hub ids and folders without one)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("model_type")


def is_vlm_folder(path: str | Path) -> bool:
    return model_type_of(path) in VLM_MODEL_TYPES


def is_vlm(model: nn.Module) -> bool:
    """True for a (possibly PEFT-wrapped) LLaVA model."""
    inner = unwrap(model)
    return getattr(inner.config, "model_type", None) in VLM_MODEL_TYPES


def load_tower(path: str, dtype: torch.dtype) -> nn.Module:
    """The vision half of a tower folder (a full CLIP / SigLIP folder gives its vision model)."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel  # heavy: transformers, ~3 s

    config = AutoConfig.from_pretrained(path)
    kind = config.model_type
    try:
        if kind in ("clip", "clip_vision_model"):
            return CLIPVisionModel.from_pretrained(path, dtype=dtype)
        if kind in ("siglip", "siglip_vision_model"):
            return SiglipVisionModel.from_pretrained(path, dtype=dtype)
        if kind == "dinov2":
            return AutoModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"could not load a vision tower from {path}: {str(err).splitlines()[0]}") from None
    raise ConfigError(f"vision.tower {path}: model type {kind!r} is not a supported tower (CLIP, SigLIP, DINOv2)")


def tower_image_processor(path: str, image_tokens: int, patch_size: int):
    """The tower's own image processor, resized so its patch grid gives `image_tokens` (0: unchanged)."""
    from transformers import AutoImageProcessor  # heavy: transformers, ~3 s

    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        processor = image_processor(224)  # a tower folder without one: DINOv2's resize + ImageNet stats
    return resized(processor, image_tokens, patch_size)


def resized(processor, image_tokens: int, patch_size: int):
    """The processor with its image size set for `image_tokens` per image (0: unchanged)."""
    if image_tokens:
        side = math.isqrt(image_tokens) * patch_size
        processor.size = {"height": side, "width": side}
        processor.crop_size = {"height": side, "width": side}
        processor.do_center_crop = False
    return processor


def add_image_token(tokenizer, llm: nn.Module) -> int:
    """Add `<image>` as a special token and give the LLM an embedding row for it (the mean row)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old = llm.get_input_embeddings().weight.shape[0]
    if token_id >= old:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = llm.get_input_embeddings().weight
            emb[old:] = emb[:old].mean(0)
            head = llm.get_output_embeddings()
            if head is not None and head.weight is not emb:
                head.weight[old:] = head.weight[:old].mean(0)
    return token_id


def assemble_llava(llm: nn.Module, tokenizer, tower: nn.Module, *, projector: str = "mlp2x_gelu",
                   feature_layer: int = -1, seed: int = 0) -> nn.Module:
    """LlavaForConditionalGeneration holding `llm` and `tower` (weights copied) and a seeded projector."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration  # heavy: transformers, ~3 s

    if projector not in _PROJECTOR_ACT:
        raise ConfigError(f"vision.projector {projector!r} is not one of {', '.join(_PROJECTOR_ACT)}")
    token_id = add_image_token(tokenizer, llm)
    vision_config = tower.config
    strategy = "default" if vision_config.model_type in _HAS_CLS else "full"
    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=llm.config.to_dict(),
                         image_token_id=token_id, projector_hidden_act=_PROJECTOR_ACT[projector],
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                         tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)))
    torch.manual_seed(seed)  # the projector's initial weights (everything else is copied below)
    dtype = next(llm.parameters()).dtype
    model = LlavaForConditionalGeneration(config).to(dtype)
    model.model.language_model.load_state_dict(getattr(llm, llm.base_model_prefix).state_dict())
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    model.tie_weights()
    model.generation_config = llm.generation_config
    return model


@dataclass
class ImageInputs:
    """How images enter a LLaVA model: its image processor and the tokens each image becomes."""

    processor: object  # a transformers image processor
    tokens_per_image: int
    image_token_id: int

    def pixel_values(self, images: list) -> torch.Tensor:
        """(N, 3, H, W) float pixels for N PIL images."""
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


def image_inputs(model: nn.Module, processor) -> ImageInputs:
    """Tokens per image from the tower's patch grid at the processor's image size (LlavaProcessor's rule)."""
    inner = unwrap(model)
    config = inner.config
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    height = size.get("height") or size.get("shortest_edge")
    width = size.get("width") or size.get("shortest_edge")
    patch = config.vision_config.patch_size
    tokens = (height // patch) * (width // patch)
    if config.vision_feature_select_strategy == "full" and config.vision_config.model_type in _HAS_CLS:
        tokens += 1
    return ImageInputs(processor, tokens, config.image_token_id)


def llava_processor(tokenizer, image_processor, model: nn.Module):
    """The LlavaProcessor plain transformers needs to turn `<image>` prompts into this model's inputs."""
    from transformers import LlavaProcessor  # heavy: transformers, ~3 s

    config = model.config
    extra = 1 if config.vision_config.model_type in _HAS_CLS else 0
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=extra,
                          chat_template=getattr(tokenizer, "chat_template", None))
