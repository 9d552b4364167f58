"""Conversation -> token ids + per-token loss weights, through the tokenizer's own chat template.

Assistant spans are found by prefix diff: the text a turn adds after the generation prompt is
what the model must learn to produce. Training masks and chat prompts share `_render`, so what
a model is trained on and what it is prompted with cannot drift apart.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from posttrain.records import Conversation, Message
from posttrain.errors import ConfigError, TemplateError
from posttrain.templates.builtin import BUILTIN_TEMPLATES, NEEDS_EOS

MASK_MODES = ("all", "last", "full")
TEMPLATE_NAMES = ("auto", *BUILTIN_TEMPLATES)


@dataclass
class Encoded:
    input_ids: list[int]
    weights: list[float]  # aligned with input_ids: loss weight for predicting token t (0 = no loss)


class DropSample(Exception):
    """A sample that cannot be trained on; .reason is a snake_case key ('no_assistant_turn', 'too_long')."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def apply_template(tokenizer, name: str) -> None:
    """Select the chat template: "auto" keeps the tokenizer's own, a built-in name replaces it."""
    if name == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "the tokenizer has no chat template; set template.name=chatml "
                "(or llama3, alpaca, plain for a base model)"
            )
        return
    if name not in BUILTIN_TEMPLATES:
        close = difflib.get_close_matches(name, TEMPLATE_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TemplateError(f"unknown template.name {name!r}{hint}; choose one of {', '.join(TEMPLATE_NAMES)}")
    if name in NEEDS_EOS and tokenizer.eos_token is None:
        # Without eos the model never learns to stop, and the template would render "" silently.
        raise TemplateError(f"template {name!r} ends answers with eos_token, but the tokenizer has none")
    tokenizer.chat_template = BUILTIN_TEMPLATES[name]


def _with_system(messages: list[Message], system: str | None) -> list[Message]:
    if system is not None and not any(m.role == "system" for m in messages):
        return [Message(role="system", content=system), *messages]
    return list(messages)


def _render(tokenizer, messages: list[Message], tools, add_generation_prompt: bool, source: str = "") -> str:
    """The one rendering call used for training spans and generation prompts alike."""
    try:
        return tokenizer.apply_chat_template(
            [m.to_template_dict() for m in messages], tools=tools or None, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as exc:  # jinja2 errors, raise_exception() in templates, missing template
        where = f" ({source})" if source else ""
        raise TemplateError(f"chat template failed to render{where}: {exc}") from exc


def _turn_weights(messages: list[Message], mode: str) -> dict[int, float]:
    """Loss weight of each supervised message, keyed by index (mode "full" weighs every message)."""
    if mode == "full":
        return {i: 1.0 for i in range(len(messages))}
    assistant = [i for i, m in enumerate(messages) if m.role == "assistant" and i > 0]
    if mode == "last":
        assistant = assistant[-1:]
    out = {}
    for i in assistant:
        weight = messages[i].loss_weight
        out[i] = 1.0 if weight is None else float(weight)
    return {i: w for i, w in out.items() if w > 0}


def _assistant_spans(tokenizer, messages, tools, indices, source) -> tuple[str, list[tuple[int, int, int]]]:
    """Full text F and (message index, char start, char end) of each supervised assistant turn."""
    full = _render(tokenizer, messages, tools, False, source)
    spans = []
    for i in indices:
        prompt = _render(tokenizer, messages[:i], tools, True, source)
        upto = _render(tokenizer, messages[: i + 1], tools, False, source)
        if not upto.startswith(prompt) or not full.startswith(upto):
            where = f" ({source})" if source else ""
            raise TemplateError(
                f"chat template is not prefix-stable at message {i}{where}: rendering the conversation "
                "up to this turn changes earlier text, so the assistant span cannot be found; "
                "set template.name to a built-in (chatml, llama3, alpaca, plain)"
            )
        # Trailing whitespace after the end-of-turn marker is part of the next turn's header.
        span = upto[len(prompt):].rstrip()
        spans.append((i, len(prompt), len(prompt) + len(span)))
    return full, spans


def _encode_messages(messages, tokenizer, tools, mode, source) -> Encoded:
    weights_by_turn = _turn_weights(messages, mode)
    if not weights_by_turn:
        raise DropSample("no_assistant_turn", source)
    if mode == "full":
        full, spans = _render(tokenizer, messages, tools, False, source), []
    else:
        full, spans = _assistant_spans(tokenizer, messages, tools, sorted(weights_by_turn), source)
    # One tokenization of the whole text, exactly as apply_chat_template(tokenize=True) does it.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if mode == "full":
        return Encoded(ids, [0.0] + [1.0] * (len(ids) - 1))
    weights = [0.0] * len(ids)
    k = 0  # spans and token starts are both increasing: one merge-like pass
    for t, (start, _end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][2]:
            k += 1
        if k == len(spans):
            break
        i, lo, hi = spans[k]
        if lo <= start < hi:
            weights[t] = weights_by_turn[i]
    if weights and weights[0]:
        weights[0] = 0.0  # nothing predicts the first token
    return Encoded(ids, weights)


def _drop_oldest_exchange(messages: list[Message], mode: str) -> list[Message] | None:
    """Remove the earliest user..assistant exchange (keeping leading system messages), or None."""
    first = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
    reply = next((i for i in range(first, len(messages)) if messages[i].role == "assistant"), None)
    if reply is None:
        return None
    nxt = next((i for i in range(reply + 1, len(messages)) if messages[i].role == "user"), None)
    if nxt is None:
        return None
    kept = messages[:first] + messages[nxt:]
    if not _turn_weights(kept, mode):
        return None  # the cut would remove the last supervised turn: the sample is simply too long
    return kept


def _encode_text(text: str, tokenizer, max_length: int | None) -> list[Encoded]:
    if tokenizer.eos_token_id is None:
        raise TemplateError("plain-text records need an eos_token to separate documents; the tokenizer has none")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    size = max_length or len(ids)
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    # A one-token tail has nothing to predict.
    return [Encoded(c, [1.0] * len(c)) for c in chunks if len(c) > 1]


def encode_conversation(
    conv: Conversation, tokenizer, *, mask: str = "all", max_length: int | None = None, system: str | None = None
) -> list[Encoded]:
    """Token ids and loss weights for one record: one Encoded per conversation, chunks for plain text.

    mask: "all" trains every assistant turn (Message.loss_weight overrides 1.0), "last" only the
    final assistant turn, "full" every token. Too long: the oldest exchanges are dropped first.
    Under "all" / "last" a conversation must end with an assistant reply (else DropSample no_final_reply).
    """
    if mask not in MASK_MODES:
        raise ConfigError(f"unknown mask mode {mask!r}; choose one of {', '.join(MASK_MODES)}")
    if conv.text is not None and not conv.messages:
        return _encode_text(conv.text, tokenizer, max_length)
    if not conv.messages:
        raise DropSample("empty", conv.source)
    messages = _with_system(conv.messages, system)
    if mask != "full" and messages[-1].role != "assistant" and _turn_weights(messages, mask):
        # a trailing user / tool turn has no reply to learn from: a truncated or prompt-only row
        raise DropSample("no_final_reply", conv.source)
    while True:
        encoded = _encode_messages(messages, tokenizer, conv.tools, mask, conv.source)
        if max_length is None or len(encoded.input_ids) <= max_length:
            return [encoded]
        messages = _drop_oldest_exchange(messages, mask)
        if messages is None:
            raise DropSample("too_long", f"{conv.source} {len(encoded.input_ids)} tokens > {max_length}".strip())


def encode_prompt(
    messages: list[Message], tokenizer, *, tools: list[dict] | None = None, system: str | None = None
) -> list[int]:
    """Ids to generate from: the conversation plus the assistant header, exactly as in training."""
    text = _render(tokenizer, _with_system(messages, system), tools, True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
