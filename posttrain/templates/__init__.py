"""Chat templates: messages -> token ids + per-token loss weights, and prompts for generation."""

from posttrain.templates.render import (
    MASK_MODES,
    TEMPLATE_NAMES,
    DropSample,
    Encoded,
    apply_template,
    encode_conversation,
    encode_prompt,
)

__all__ = [
    "MASK_MODES",
    "TEMPLATE_NAMES",
    "DropSample",
    "Encoded",
    "apply_template",
    "encode_conversation",
    "encode_prompt",
]
