"""The SFT forward of a LLaVA model: the text SFT's supervised-positions-only loss with images in place.

Image tokens sit in the token rows like any other token; the batch adds what fills them, in the
order they appear (row by row, sample by sample): cached tower features (frozen tower) that only the
projector still maps, or pixels (trained tower). Projected features go into LlavaModel through its own
`mm_encoder_outputs` argument, so the scatter into the image-token positions is transformers' own.
Packing and the head-at-supervised-positions-only loss are the text SFT's (models/forward.py).
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from posttrain.models.anatomy import lm_head_and_backbone, unwrap
from posttrain.models.forward import supervised_loss
from posttrain.models.packed_attention import packed_attention


def image_kwargs(model, batch: dict) -> dict:
    """What LlavaModel.forward takes for this batch's images: projected cached features, or pixels."""
    features = batch.get("image_features")
    if features is not None and features.shape[0]:
        projected = unwrap(model).model.multi_modal_projector(features)  # (N, T, H)
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}}
    pixels = batch.get("pixel_values")
    if pixels is not None and pixels.shape[0]:
        return {"pixel_values": pixels}
    return {}


def vision_hidden_states(model, batch: dict, fused: bool = True) -> torch.Tensor:
    """Final hidden states (B, T, H) with the images in place; packed samples never see each other."""
    backbone, _ = lm_head_and_backbone(model)
    text_config = unwrap(model).config.get_text_config()
    with packed_attention(text_config, enabled=fused):
        return backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **image_kwargs(model, batch))


def vision_sft_forward(model, batch: dict, normalizer: float, chunk: int = 1024,
                       fused: bool = True) -> tuple[torch.Tensor, dict]:
    """Weighted next-token loss of a micro-batch with images (no loss is ever on an image token)."""
    return supervised_loss(model, vision_hidden_states(model, batch, fused), batch, normalizer, chunk, fused)
