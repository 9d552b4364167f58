"""`<image>` placeholders in rendered chat text: each becomes the image's run of image tokens.

A vision model sees an image as N embeddings (its projected patch features), so the rendered prompt
holds N `<image>` tokens per image; N is set on the tokenizer (`set_image_tokens`) by whoever loads
the vision model. Expanding the rendered text (not the messages) keeps the chat template's own
rendering untouched; no loss is ever taken on predicting an image token.
"""

from __future__ import annotations

from posttrain.records import IMAGE_PLACEHOLDER

IMAGE_TOKENS_ATTR = "posttrain_image_tokens"


def set_image_tokens(tokenizer, tokens_per_image: int) -> None:
    """Mark `tokenizer` as feeding a vision model whose images are `tokens_per_image` tokens long."""
    setattr(tokenizer, IMAGE_TOKENS_ATTR, int(tokens_per_image))


def image_tokens(tokenizer) -> int:
    """Tokens per image (0: the tokenizer feeds a text-only model)."""
    return int(getattr(tokenizer, IMAGE_TOKENS_ATTR, 0) or 0)


def expand_images(text: str, tokenizer) -> str:
    n = image_tokens(tokenizer)
    return text.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * n) if n > 1 else text


def zero_image_weights(input_ids: list[int], weights: list[float], tokenizer) -> list[float]:
    """Weights with 0 wherever the token is an image token (the model never learns to predict images)."""
    if not image_tokens(tokenizer):
        return weights
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return [0.0 if t == image_id else w for t, w in zip(input_ids, weights)]
