"""Loading vision-language models for training and inference, with the image inputs they need.

Training: `load_vision_model` opens a LLaVA folder (a run, an export, any HF LLaVA) or assembles one
from `model.name_or_path` + `vision.tower`. Inference: `attach_image_inputs` gives a loaded LLaVA its
image processor (saved beside the weights) and marks the tokenizer with the tokens per image, so
`<image>` placeholders expand exactly as in training. `image_inputs_of(model)` is what chat, serve and
eval ask; None means a text-only model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from posttrain.errors import ConfigError, ModelSourceError
from posttrain.models.anatomy import unwrap
from posttrain.models.load import load_base
from posttrain.models.sources import resolve_model
from posttrain.models.vision import (ImageInputs, assemble_llava, image_inputs, is_vlm, is_vlm_folder, llava_processor,
                                     load_tower, resized, tower_image_processor)
from posttrain.templates.images import set_image_tokens

log = logging.getLogger(__name__)
_ATTR = "posttrain_image_inputs"


def wants_vision(model_cfg, vision_cfg) -> bool:
    """True when this run trains a vision-language model: a vision tower is set, or the model is a LLaVA folder."""
    if vision_cfg.tower:
        return True
    try:
        return is_vlm_folder(resolve_model(model_cfg.name_or_path))
    except ModelSourceError:
        return False


def load_vision_model(model_cfg, vision_cfg, device, seed: int = 0) -> tuple[nn.Module, object, ImageInputs]:
    """(LLaVA model on `device`, tokenizer marked with its image tokens, its ImageInputs)."""
    path = resolve_model(model_cfg.name_or_path)
    if is_vlm_folder(path):
        if vision_cfg.tower:
            raise ConfigError(f"model.name_or_path {model_cfg.name_or_path} is already a LLaVA model (it has its own "
                              "vision tower); leave vision.tower empty")
        model, tokenizer = load_base(model_cfg, device)
        processor = resized(load_image_processor(path), vision_cfg.image_tokens, model.config.vision_config.patch_size)
    elif vision_cfg.tower:
        llm, tokenizer = load_base(model_cfg, "cpu")
        dtype = next(llm.parameters()).dtype
        tower_path = resolve_model(vision_cfg.tower)
        tower = load_tower(tower_path, dtype)
        model = assemble_llava(llm, tokenizer, tower, projector=vision_cfg.projector,
                               feature_layer=vision_cfg.feature_layer, seed=seed).to(device)
        del llm, tower
        processor = tower_image_processor(tower_path, vision_cfg.image_tokens, model.config.vision_config.patch_size)
    else:
        raise ConfigError(f"{model_cfg.name_or_path} has no vision tower: set vision.tower (e.g. dinov2-small)")
    return model, tokenizer, _attach(model, tokenizer, processor)


def load_image_processor(folder: str | Path):
    from transformers import AutoImageProcessor  # heavy: transformers, ~3 s

    try:
        return AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelSourceError(f"{folder}: a LLaVA model without an image processor (processor_config.json): "
                               f"{first}") from None


def _attach(model: nn.Module, tokenizer, processor) -> ImageInputs:
    inputs = image_inputs(model, processor)
    set_image_tokens(tokenizer, inputs.tokens_per_image)
    setattr(unwrap(model), _ATTR, inputs)  # on the LLaVA itself: still there after a LoRA merge
    return inputs


def attach_image_inputs(model: nn.Module, tokenizer, folders: list[Path]) -> ImageInputs | None:
    """For a loaded LLaVA: its image processor from the first of `folders` that has one; None for text models."""
    if not is_vlm(model):
        return None
    for folder in folders:
        if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
            return _attach(model, tokenizer, load_image_processor(folder))
    raise ModelSourceError(f"{folders[0]}: a LLaVA model without an image processor (processor_config.json)")


def image_inputs_of(model: nn.Module) -> ImageInputs | None:
    """The ImageInputs attached when the model was loaded (None: a text-only model)."""
    return getattr(unwrap(model), _ATTR, None)


def save_processor(model: nn.Module, tokenizer, out_dir: str | Path) -> None:
    """Write the LlavaProcessor (image processor + tokenizer + chat template) beside saved weights."""
    inputs = image_inputs_of(model)
    if inputs is None:
        return
    inner = unwrap(model)
    llava_processor(tokenizer, inputs.processor, inner).save_pretrained(str(out_dir))
