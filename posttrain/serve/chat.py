"""`posttrain chat`: a multi-turn terminal REPL over the generation layer (models/generate.py).

Prompts are rendered by `encode_prompt`, the same code that builds training samples, so a chat
sees exactly the format the model was trained on.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from posttrain.records import Message
from posttrain.models.generate import generate_reply
from posttrain.templates.render import encode_prompt

EXIT_WORDS = ("exit", "quit")
CLEAR_WORD = "clear"


def run_repl(
    model: nn.Module, tokenizer, *, system: str | None = None, max_new_tokens: int = 256,
    temperature: float = 0.0, top_p: float = 1.0,
    input_fn: Callable[[str], str] = input, print_fn: Callable[..., None] = print,
) -> list[Message]:
    """Chat until `exit`/`quit`/EOF; `clear` forgets the history. Returns the final history."""
    history: list[Message] = []
    print_fn(f"chat: '{CLEAR_WORD}' resets the conversation, '{EXIT_WORDS[0]}' or Ctrl-D ends it")
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
            history = []
            print_fn("(history cleared)")
            continue
        history.append(Message(role="user", content=text))
        _trim_history(history, model, tokenizer, system, max_new_tokens)
        print_fn("assistant> ", end="", flush=True)
        reply = generate_reply(
            model, tokenizer, history, system=system, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p,
            stream_to=lambda piece: print_fn(piece, end="", flush=True),
        )
        print_fn()
        history.append(Message(role="assistant", content=reply))
    return history


def _trim_history(history: list[Message], model, tokenizer, system: str | None, max_new_tokens: int) -> None:
    """Drop the oldest exchanges while the prompt plus the reply would overrun the context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    while len(history) > 1 and len(encode_prompt(history, tokenizer, system=system)) + max_new_tokens > limit:
        del history[:2]  # one user turn and its reply, keeping turns paired
