"""PPO rollouts: prompts from data files, batched sampling with the KV cache, per-token log-probs and values.

A rollout holds one batch of sampled responses and everything PPO needs about them, each
field named with its shape. Log-probs are taken at response positions only, so the prompt
never materialises vocabulary-sized logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
from torch import nn

from posttrain.data.formats import row_to_conversation
from posttrain.data.reading import read_rows, source_of
from posttrain.data.records import Message
from posttrain.errors import PosttrainError
from posttrain.losses.ppo import entropy_from_logits
from posttrain.models.methods import lm_head_and_backbone
from posttrain.templates.render import encode_prompt


@dataclass
class Prompt:
    messages: list[Message]  # the conversation up to (not including) the reply to generate
    ids: list[int]  # encode_prompt(messages): template + generation header, as in training

    @property
    def text(self) -> str:
        """The last user message: what rule rewards and reward models read as the prompt."""
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")


@dataclass
class Rollout:
    """One rollout batch. B rollouts, P prompt positions (left-padded), R response positions (right-padded)."""

    input_ids: torch.Tensor  # (B, P+R) prompt then response tokens
    attention_mask: torch.Tensor  # (B, P+R) bool, False on padding (both sides)
    response_mask: torch.Tensor  # (B, R) bool, True on sampled tokens up to and including the stop token
    old_token_logps: torch.Tensor  # (B, R) log pi_old(y_t) at sampling time
    ref_token_logps: torch.Tensor  # (B, R) log pi_ref(y_t), the frozen SFT model
    old_values: torch.Tensor  # (B, R) V(s_t) at sampling time
    advantages: torch.Tensor  # (B, R) GAE advantages (whitened when configured)
    returns: torch.Tensor  # (B, R) value targets: advantages + values (before whitening)

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def select(self, index: torch.Tensor) -> Rollout:
        """The rollouts at `index` (a mini-batch)."""
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def load_prompts(data_cfg, template_cfg, tokenizer, max_new_tokens: int) -> tuple[list[Prompt], int]:
    """Every conversation in data.datasets, cut before its final assistant turn, encoded for generation.

    Returns (prompts, dropped): prompts whose ids leave no room for max_new_tokens within
    data.max_length are dropped and counted.
    """
    prompts, dropped = [], 0
    for ds in data_cfg.datasets:
        rows = read_rows(ds.path)
        limit = len(rows) if ds.max_samples is None else min(ds.max_samples, len(rows))
        for i in range(limit):
            conv = row_to_conversation(rows[i], ds.format, source=source_of(ds.path, i), columns=ds.columns,
                                       role_tags=ds.role_tags, variables=data_cfg.variables)
            messages = list(conv.messages)
            while messages and messages[-1].role == "assistant":
                messages.pop()
            if not any(m.role == "user" for m in messages):
                dropped += 1
                continue
            ids = encode_prompt(messages, tokenizer, tools=conv.tools, system=template_cfg.system)
            if len(ids) + max_new_tokens > data_cfg.max_length:
                dropped += 1
                continue
            prompts.append(Prompt(messages, ids))
    if not prompts:
        raise PosttrainError(f"stage ppo: no usable prompts in data.datasets ({dropped} dropped: no user turn "
                             "or too long for data.max_length - ppo.max_new_tokens)")
    return prompts, dropped


def prompt_indices(n_prompts: int, step: int, batch: int, seed: int) -> list[int]:
    """The prompts of PPO step `step` (0-based): a seeded reshuffle per pass, so resume is exact."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(pos, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[k]))
    return out


class PolicyAndValue(nn.Module):
    """The policy (LoRA or full) with a scalar value head, on its own backbone or a separate critic."""

    def __init__(self, policy: nn.Module, hidden_size: int, critic: nn.Module | None = None):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no random baseline noise in step 1
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(policy.parameters()).device)

    def forward(self, input_ids, attention_mask, response_len: int, temperature: float = 1.0,
                values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(token_logps (B, R), values (B, R) or None, entropy (B, R)) at the last R positions."""
        backbone, head = lm_head_and_backbone(self.policy)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding shifts positions
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask.long(), "position_ids": position_ids}
        hidden = backbone(**inputs)[:, -response_len - 1:-1]  # (B, R, H) states predicting each response token
        logits = head(hidden).float() / temperature  # (B, R, V) same temperature as sampling
        targets = input_ids[:, -response_len:]  # (B, R)
        token_logps = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = entropy_from_logits(logits)
        if not values:
            return token_logps, None, entropy
        if self.critic is not None:
            critic_backbone, _ = lm_head_and_backbone(self.critic)
            hidden = critic_backbone(**inputs)[:, -response_len - 1:-1]
        return token_logps, self.value_head(hidden.float()).squeeze(-1), entropy

    def reference(self):
        """Context in which self.policy computes the reference (SFT) model: LoRA adapters disabled."""
        disable = getattr(self.policy, "disable_adapter", None)
        return disable() if callable(disable) else contextlib.nullcontext()


@torch.no_grad()
def sample(policy: nn.Module, tokenizer, prompts: list[Prompt], ppo_cfg, stops: list[int]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per prompt (KV cache, left padding).

    Returns (input_ids (B, P+R), attention_mask (B, P+R), response_mask (B, R), ended (B,)):
    ended = the response stopped on its own (stop token or stop string) within max_new_tokens.
    """
    from transformers import GenerationConfig

    device = next(policy.parameters()).device
    pad_id = tokenizer.pad_token_id
    width = max(len(p.ids) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, P)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.bool)  # (B, P)
    for b, p in enumerate(prompts):
        prompt_ids[b, width - len(p.ids):] = torch.tensor(p.ids)
        prompt_mask[b, width - len(p.ids):] = True
    gen_cfg = GenerationConfig(
        do_sample=True, temperature=ppo_cfg.temperature, top_p=ppo_cfg.top_p, top_k=0,  # top_k=0: off
        max_new_tokens=ppo_cfg.max_new_tokens, eos_token_id=stops, pad_token_id=pad_id,
        stop_strings=ppo_cfg.stop_strings or None)
    policy.eval()
    out = policy.generate(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.long().to(device),
                          generation_config=gen_cfg, tokenizer=tokenizer if ppo_cfg.stop_strings else None)
    response = out[:, width:].cpu()  # (B, R)
    is_stop = torch.isin(response, torch.tensor(stops))
    has_stop = is_stop.any(1)
    first_stop = torch.where(has_stop, is_stop.float().argmax(1), torch.full_like(has_stop, 10**9, dtype=torch.long))
    # Without a stop token a row may still have ended on a stop string: generate pads it afterwards.
    not_pad = response != pad_id
    last_real = torch.where(not_pad.any(1), response.shape[1] - 1 - not_pad.flip(1).float().argmax(1), -1)
    length = torch.where(has_stop, first_stop + 1, last_real + 1)  # (B,)
    response_mask = torch.arange(response.shape[1]).unsqueeze(0) < length.unsqueeze(1)  # (B, R)
    ended = has_stop | (length < response.shape[1])
    input_ids = torch.cat([prompt_ids, torch.where(response_mask, response, pad_id)], 1)
    return input_ids, torch.cat([prompt_mask, response_mask], 1), response_mask, ended
