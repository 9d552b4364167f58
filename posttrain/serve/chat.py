"""Chat with a model: one reply (`generate_reply`) and a multi-turn terminal REPL (`run_repl`).

Prompts are rendered by `encode_prompt`, the same code that builds training samples, so a chat
sees exactly the format the model was trained on. Generation stops at eos or the template's
end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationConfig, TextStreamer

from posttrain.data.records import Message
from posttrain.models.run import stop_token_ids
from posttrain.templates.render import encode_prompt

EXIT_WORDS = ("exit", "quit")
CLEAR_WORD = "clear"


class _CallbackStreamer(TextStreamer):
    """Hands each decoded piece to a callback; TextStreamer holds back half-formed words."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


@torch.no_grad()
def generate_reply(
    model: nn.Module, tokenizer, messages: list[Message], *, system: str | None = None,
    max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
    stream_to: Callable[[str], None] | None = None,
) -> str:
    """The assistant's next reply to `messages`; temperature 0 is greedy (deterministic)."""
    prompt_ids = encode_prompt(messages, tokenizer, system=system)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    stops = stop_token_ids(model, tokenizer)
    greedy = temperature <= 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy,
        # Sampling knobs only when sampling: transformers warns about them under greedy decoding.
        temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None,
        eos_token_id=stops or None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [None])[0],
    )
    streamer = _CallbackStreamer(tokenizer, stream_to) if stream_to is not None else None
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        generation_config=gen_cfg, streamer=streamer,
    )
    new_ids = output[0, input_ids.shape[1]:]  # (N,)
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()


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
