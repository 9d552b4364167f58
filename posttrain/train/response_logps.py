"""Per-token log-probs of sampled responses under a policy, for RL updates (and their old / reference passes).

Packed (`packs_rows`: the fused paths, sdpa attention, no virtual tokens): a micro-batch's rows become
one packed row in which consecutive responses to the same prompt share one copy of it
(models/packed_attention.py), so neither padding nor repeated prompts cost compute, and the LM head
runs at response positions only (train/head_logps.py). Padded: the rows as sampled (prompts
left-padded, responses right-padded) through the backbone with an attention mask.
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain.data.preference_batch import pack_sequences
from posttrain.models.anatomy import lm_head_and_backbone
from posttrain.models.forward import hidden_states
from posttrain.models.head_logps import token_logps


def scaled_token_logps(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int,
                       fused: bool) -> torch.Tensor:
    """(N,) log softmax(head(h) / temperature)[targets]: the distribution the sampler drew from."""
    if temperature == 1.0:
        return token_logps(head, hidden, targets, chunk, fused)
    if getattr(head, "bias", None) is None:  # h W^T / t = (h / t) W^T: scale the input, keep the fused head
        return token_logps(head, hidden / temperature, targets, chunk, fused)
    logits = head(hidden).float() / temperature  # (N, V): a biased head takes the plain path
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]


def packed_response_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          response_mask: torch.Tensor, groups: list[int], temperature: float = 1.0,
                          chunk: int = 1024) -> torch.Tensor:
    """(B, R) log-probs of the response tokens (0 elsewhere); rows in one packed row, consecutive rows of
    the same group (same prompt) sharing its tokens. input_ids / attention_mask (B, P+R), response_mask (B, R)."""
    _, head = lm_head_and_backbone(model)
    width = response_mask.shape[1]
    prompt_w = input_ids.shape[1] - width
    flat = []  # (ids, weights, shared prefix length, group) as pack_sequences reads them
    for ids, keep, resp_mask, group in zip(input_ids.tolist(), attention_mask[:, :prompt_w].tolist(),
                                           response_mask.tolist(), groups):
        prompt = [t for t, k in zip(ids[:prompt_w], keep) if k]
        response = [t for t, k in zip(ids[prompt_w:], resp_mask) if k]
        flat.append((prompt + response, [0.0] * len(prompt) + [1.0] * len(response), len(prompt), group))
    batch, where = pack_sequences(flat)
    columns = []  # position predicting each response token, row by row
    for (ids, _, p, _), (col, _, prefix_col) in zip(flat, where):
        # token p + k is predicted at position p + k - 1: the prompt's last token (in the group's shared copy)
        # for k = 0, else the row's own previous token
        columns += [prefix_col + p - 1] + [col + k - 1 for k in range(1, len(ids) - p)]
    device = input_ids.device
    batch = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device)}
    hidden = hidden_states(model, batch, fused=True, shared_prefix=True)[0]  # (T, H)
    targets = input_ids[:, prompt_w:][response_mask]  # (N,) row-major, as columns
    logps = scaled_token_logps(head, hidden[torch.tensor(columns, device=device)], targets, temperature, chunk, True)
    return torch.zeros(response_mask.shape, dtype=logps.dtype, device=device).masked_scatter(response_mask, logps)


def padded_response_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          response_mask: torch.Tensor, temperature: float = 1.0, chunk: int = 1024,
                          fused: bool = True) -> torch.Tensor:
    """(B, R) log-probs of the response tokens (0 elsewhere), the rows as sampled, with an attention mask."""
    backbone, head = lm_head_and_backbone(model)
    width = response_mask.shape[1]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding shifts positions
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask.long(),
                      position_ids=position_ids)[:, -width - 1:-1]  # (B, R, H) states predicting each response token
    targets = input_ids[:, -width:][response_mask]  # (N,)
    logps = scaled_token_logps(head, hidden[response_mask], targets, temperature, chunk, fused)
    return torch.zeros(response_mask.shape, dtype=logps.dtype, device=input_ids.device).masked_scatter(
        response_mask, logps)


def response_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   response_mask: torch.Tensor, groups: list[int], *, pack: bool, temperature: float = 1.0,
                   chunk: int = 1024, fused: bool = True) -> torch.Tensor:
    """(B, R) response-token log-probs, packed (rows of a group share their prompt) or padded."""
    if pack:
        return packed_response_logps(model, input_ids, attention_mask, response_mask, groups, temperature, chunk)
    return padded_response_logps(model, input_ids, attention_mask, response_mask, temperature, chunk, fused)
