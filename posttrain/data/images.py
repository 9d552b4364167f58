"""Images in conversations: where they are written in a row, how a reference resolves, how a file decodes.

Rows name images three ways, all ending as `<image>` placeholders in the text plus `Conversation.images`:
- LLaMA-Factory's mllm layout (and sharegpt with `images`): `<image>` in the messages, an `images` list;
- OpenAI content parts: `{"type": "image_url", "image_url": {"url": ...}}` becomes a placeholder in place.
A reference is a file path (relative paths: to the data file's folder) or a `data:image/...;base64,` URL.
Every problem is a DataError naming the row's file, line and field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from pathlib import Path

from posttrain.records import IMAGE_PLACEHOLDER
from posttrain.errors import DataError
from posttrain.templates.images import image_tokens

MEDIA_FIELDS = ("images", "videos", "audios")  # LLaMA-Factory's multimodal columns
MAX_IMAGE_PIXELS = 40_000_000  # a larger image is refused before decoding (decompression bombs)


def image_list(value, ctx) -> list[str]:
    """The `images` column: a list of path / data-URL strings (one string is one image)."""
    if value is None or value == []:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ctx.fail("images", f"must be a list of image paths, got {type(value).__name__}")
    for i, item in enumerate(value):
        if isinstance(item, dict):  # {"path": ...} / {"url": ...} as some exports write them
            item = item.get("path") or item.get("url")
        if not isinstance(item, str) or not item.strip():
            raise ctx.fail(f"images[{i}]", "must be an image path or a data: URL")
        value[i] = item
    return list(value)


def content_text(parts, ctx, field: str, images: list[str] | None) -> str:
    """OpenAI content parts -> text: text parts joined, each image_url part a `<image>` placeholder whose
    URL is appended to `images` (None: the model takes no images, so an image part is an error)."""
    text = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text.append(str(part.get("text") or ""))
        elif kind in ("image_url", "image"):
            if images is None:
                raise ctx.fail(f"{field}[{j}]", no_vision_message("an image"))
            url = part.get("image_url", part.get("image"))
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.strip():
                raise ctx.fail(f"{field}[{j}].image_url.url", "is missing/empty")
            images.append(url)
            text.append(IMAGE_PLACEHOLDER)
        else:
            raise ctx.fail(f"{field}[{j}]", f"has unsupported content part type {kind!r} (text or image_url)")
    return "".join(text)


def has_images(row) -> bool:
    """Whether a raw row carries images: a non-empty `images` column, or an OpenAI image_url / image content part
    in any message (data commands parse such rows as a vision model's training run does)."""
    if row.get("images"):
        return True
    for value in row.values():
        if not isinstance(value, list):
            continue
        for message in value:
            parts = message.get("content") if isinstance(message, dict) else None
            if isinstance(parts, list) and any(isinstance(p, dict) and p.get("type") in ("image_url", "image")
                                               for p in parts):
                return True
    return False


def image_fields(conv_images: list[str], row) -> list[str]:
    """The field each of a parsed row's images came from, in order: image_url parts first, then `images[i]`
    (row_to_conversation collects them in that order)."""
    value = row.get("images") or []
    column = 1 if isinstance(value, str) else len(value)
    parts = len(conv_images) - column
    return [f"image_url part {k + 1}" for k in range(parts)] + [f"images[{i}]" for i in range(column)]


def no_vision_message(what: str) -> str:
    return (f"holds {what}, but the model has no vision tower: set vision.tower (e.g. dinov2-small) or use a "
            "LLaVA model to train on images, or remove the rows with images")


def check_placeholders(texts: list[str], images: list[str], ctx) -> None:
    """Every image needs one `<image>` placeholder in the messages, in order, and vice versa."""
    count = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    if count != len(images):
        raise ctx.fail("images", f"has {len(images)} image(s) but the messages hold {count} {IMAGE_PLACEHOLDER} "
                                 "placeholder(s); each image needs exactly one")


def resolve(ref: str, base_dir: str | Path | None) -> str:
    """A data URL unchanged; a relative path joined to `base_dir` (the data file's folder)."""
    if ref.startswith("data:") or base_dir is None or Path(ref).expanduser().is_absolute():
        return ref if ref.startswith("data:") else str(Path(ref).expanduser())
    return str(Path(base_dir) / ref)


def kept_images(images: list[str], input_ids: list[int], tokenizer, base_dir: str | Path) -> list[str]:
    """The images a sample's tokens still hold (dropping old turns to fit max_length drops their images too:
    the last k, for k image runs left), resolved against the data file's folder."""
    if not images:
        return []
    n = image_tokens(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    k = sum(1 for t in input_ids if t == image_id) // max(n, 1)
    return [resolve(ref, base_dir) for ref in images[len(images) - k:]] if k else []


def image_bytes(ref: str, where: str = "") -> bytes:
    """The encoded bytes of a path or a base64 data URL; DataError when missing or malformed."""
    prefix = f"{where}: " if where else ""
    if ref.startswith("data:"):
        head, sep, payload = ref.partition(",")
        if not sep or ";base64" not in head or not head[5:].startswith("image/"):
            raise DataError(f"{prefix}image URL must be data:image/<type>;base64,<data>, got {ref[:40]!r}")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise DataError(f"{prefix}image data URL is not valid base64") from None
    if ref.startswith(("http://", "https://")):
        raise DataError(f"{prefix}image {ref[:60]!r}: web URLs are not fetched; download the file and give its path")
    path = Path(ref)
    if not path.is_file():
        raise DataError(f"{prefix}image file not found: {ref}")
    return path.read_bytes()


def decode(data: bytes, where: str = ""):
    """RGB PIL image from encoded bytes; DataError when it does not decode or is implausibly large."""
    from PIL import Image, UnidentifiedImageError  # heavy-ish: Pillow, loaded only when an image is decoded

    prefix = f"{where}: " if where else ""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{prefix}image is {img.width}x{img.height}, over {MAX_IMAGE_PIXELS} pixels")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise DataError(f"{prefix}image does not decode: {str(err).splitlines()[0]}") from None


def load_image(ref: str, where: str = ""):
    return decode(image_bytes(ref, where), where)


def image_key(ref: str) -> str:
    """What identifies an image for feature caches: its file's path, size and mtime, or a data URL's hash."""
    if ref.startswith("data:"):
        return "data:" + hashlib.sha256(ref.encode()).hexdigest()
    stat = Path(ref).stat()
    return f"{Path(ref).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
