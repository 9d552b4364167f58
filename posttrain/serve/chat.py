"""`posttrain chat`: a multi-turn terminal REPL over the generation layer (models/generate.py).

Prompts are rendered by `encode_prompt`, the same code that builds training samples, so a chat
sees exactly the format the model was trained on.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from posttrain.data.images import load_image
from posttrain.errors import DataError
from posttrain.models.anatomy import context_length
from posttrain.models.generate import generate_reply
from posttrain.models.onednn_linear import onednn_linears
from posttrain.models.vision_load import image_inputs_of
from posttrain.records import IMAGE_PLACEHOLDER, Message
from posttrain.templates.render import encode_prompt

EXIT_WORDS = ("exit", "quit")
CLEAR_WORD = "clear"
IMAGE_COMMAND = "/image"


def run_repl(
    model: nn.Module, tokenizer, *, system: str | None = None, max_new_tokens: int = 256,
    temperature: float = 0.0, top_p: float = 1.0,
    input_fn: Callable[[str], str] = input, print_fn: Callable[..., None] = print,
) -> list[Message]:
    """Chat until `exit`/`quit`/EOF; `clear` forgets the history; `/image PATH` (vision models) attaches an
    image to the next message. Returns the final history."""
    history: list[Message] = []
    images, pending = [], []  # every image in the history (in placeholder order), and those for the next turn
    vision = image_inputs_of(model)
    hint = f", '{IMAGE_COMMAND} PATH' attaches an image" if vision is not None else ""
    print_fn(f"chat: '{CLEAR_WORD}' resets the conversation, '{EXIT_WORDS[0]}' or Ctrl-D ends it{hint}")
    # fixed weights: their oneDNN copies made once for the session, not per reply (a greedy head: greedy_head.py)
    with onednn_linears(model, head="greedy" if temperature <= 0 else "float32"):
        while True:
            try:
                line = input_fn("you> ")
            except (EOFError, KeyboardInterrupt):
                print_fn()
                break
            text = line.strip()
            if not text:
                continue
            if text.lower() in EXIT_WORDS:
                break
            if text.lower() == CLEAR_WORD:
                history, images, pending = [], [], []
                print_fn("(history cleared)")
                continue
            if text.startswith(IMAGE_COMMAND):
                _attach(text[len(IMAGE_COMMAND):].strip(), vision, pending, print_fn)
                continue
            history.append(Message(role="user", content=IMAGE_PLACEHOLDER * len(pending) + text))
            images, pending = images + pending, []
            _trim_history(history, model, tokenizer, system, max_new_tokens, images)
            print_fn("assistant> ", end="", flush=True)
            reply = generate_reply(
                model, tokenizer, history, system=system, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p,
                stream_to=lambda piece: print_fn(piece, end="", flush=True),
                pixel_values=vision.pixel_values(images) if images else None,
            )
            print_fn()
            history.append(Message(role="assistant", content=reply))
    return history


def _attach(path: str, vision, pending: list, print_fn) -> None:
    if vision is None:
        print_fn("(this model takes no images)")
    elif not path:
        print_fn(f"(usage: {IMAGE_COMMAND} PATH)")
    else:
        try:
            pending.append(load_image(path))
            print_fn(f"(image {path} goes with your next message)")
        except DataError as err:
            print_fn(f"({err})")


def _trim_history(history: list[Message], model, tokenizer, system: str | None, max_new_tokens: int,
                  images: list | None = None) -> None:
    """Drop the oldest exchanges (and their images) while the prompt plus the reply would overrun the context."""
    limit = context_length(model)
    if not limit:
        return
    while len(history) > 1 and len(encode_prompt(history, tokenizer, system=system)) + max_new_tokens > limit:
        dropped = sum(m.content.count(IMAGE_PLACEHOLDER) for m in history[:2])
        del history[:2]  # one user turn and its reply, keeping turns paired
        if images:
            del images[:dropped]


def prompt_images(model, paths: list[str], text: str):
    """(message content with one `<image>` per path before `text`, pixel values or None) for a one-shot prompt."""
    if not paths:
        return text, None
    vision = image_inputs_of(model)
    if vision is None:
        raise DataError("this model takes no images (it has no vision tower); drop --image")
    return IMAGE_PLACEHOLDER * len(paths) + text, vision.pixel_values([load_image(p, "--image") for p in paths])
