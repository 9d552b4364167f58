"""Batched generation: many conversations in one left-padded `model.generate` call.

Prompts come from `encode_prompt`, the rendering path training uses, and generation stops at
the template's end-of-turn tokens (`stop_token_ids`). Evaluation and serving share this call.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationConfig

from posttrain.data.records import Message
from posttrain.models.run import stop_token_ids
from posttrain.templates.render import encode_prompt


def _pad_id(tokenizer, stops: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stops[0] if stops else 0


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    """Text before the earliest stop string (the model may run past it inside a batch)."""
    for s in stop or []:
        cut = text.find(s)
        if cut >= 0:
            text = text[:cut]
    return text


@torch.no_grad()
def generate_batch(
    model: nn.Module, tokenizer, conversations: list[list[Message]], *, system: str | None = None,
    max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
    stop: list[str] | None = None,
) -> list[str]:
    """The assistant's next reply to each conversation, in order; temperature 0 is greedy.

    Rows are left-padded so every prompt ends where generation starts; `seed` makes sampling
    repeatable; `stop` strings cut replies after decoding (stop tokens end them during decoding).
    """
    if not conversations:
        return []
    stops = stop_token_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, stops)
    prompts = [encode_prompt(conv, tokenizer, system=system) for conv in conversations]
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T) 1 on real tokens
    for b, ids in enumerate(prompts):
        input_ids[b, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, width - len(ids):] = 1
    greedy = temperature <= 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy,
        temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None,
        eos_token_id=stops or None, pad_token_id=pad_id,
    )
    if seed is not None:
        torch.manual_seed(seed)
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            generation_config=gen_cfg)
    replies = []
    for row in output[:, width:]:  # (N,) new tokens; finished rows are padded with pad_id / stops
        keep = []
        for tok in row.tolist():
            if tok in stops:
                break
            keep.append(tok)
        text = tokenizer.decode(keep, skip_special_tokens=True)
        replies.append(_cut_at_stop(text, stop).strip())
    return replies
