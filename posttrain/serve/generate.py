"""Batched generation: many prompts through one left-padded `model.generate` call.

Prompts are rendered by `encode_prompt` (the training path), so a batched answer is the answer
`posttrain chat` gives; generation stops at the template's end-of-turn tokens (`stop_token_ids`).
`generate_from_ids` is the token-level core the API server uses (it needs token counts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from posttrain.data.records import Message
from posttrain.models.run import stop_token_ids
from posttrain.templates.render import encode_prompt


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated ids, stop token and padding removed
    finish_reason: str  # "stop" (end-of-turn token or stop string) or "length"


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """Text up to the earliest stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop or [] if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate_from_ids(
    model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 256,
    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
    strip: bool = True, streamer=None, should_stop: Callable[[], bool] | None = None,
) -> list[Generation]:
    """One generation per prompt (token ids); temperature 0 is greedy, `seed` makes sampling repeatable.

    `streamer` (a transformers streamer, batch of one prompt only) sees tokens as they come;
    `should_stop`, asked after every token, ends the whole batch early when it returns True.
    """
    if not prompts:
        return []
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    # Left padding keeps every prompt's last token in the last column, where generation continues.
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    greedy = temperature <= 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy,
        temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None,
        eos_token_id=stops or None, pad_token_id=pad_id,
    )
    if seed is not None:
        torch.manual_seed(seed)
    criteria = StoppingCriteriaList([_AskEachStep(should_stop)] if should_stop is not None else [])
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg,
                            streamer=streamer, stopping_criteria=criteria)
    results = []
    for row in output[:, width:].tolist():  # (B, N) new tokens
        end = next((i for i, t in enumerate(row) if t in stops), None)
        ids = row[:end] if end is not None else row
        text = tokenizer.decode(ids, skip_special_tokens=True)
        text, hit = cut_at_stop(text, stop)
        reason = "stop" if end is not None or hit or len(ids) < max_new_tokens else "length"
        results.append(Generation(text.strip() if strip else text, ids, reason))
    return results


class _AskEachStep(StoppingCriteria):
    """Stops every row once `should_stop()` says so (checked between tokens)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


def generate_batch(
    model: nn.Module, tokenizer, conversations: list[list[Message]], *, system: str | None = None,
    max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
    stop: list[str] | None = None,
) -> list[str]:
    """The assistant's next reply to each conversation, generated as one batch."""
    prompts = [encode_prompt(conv, tokenizer, system=system) for conv in conversations]
    gens = generate_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed, stop=stop)
    return [g.text for g in gens]
