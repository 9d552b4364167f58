"""Forward passes of multiple-choice scoring: next-token log-probs after prompts (option letters), and
the token log-probs of continuations (option texts) after a prompt.

Work comes as groups `(prefix ids, [child ids, ...])`: every child is scored as prefix + child. Two paths
compute the same numbers:
  packed  one row per call: each group's prefix once, then its children, each child attending to its
          prefix through models/packed_attention.py (the shared-prompt path DPO rows use): the prefix
          runs once for all its children and nothing is padding.
  padded  one right-padded row per prefix + child (the reference path, and the one for models whose
          attention cannot take the packed path: eager attention, prompt / prefix tuning).
The LM head runs only at the positions whose next token is scored.
"""

from __future__ import annotations

import torch

from posttrain.models.anatomy import is_prompt_learning, lm_head_and_backbone, unwrap
from posttrain.models.packed_attention import packed_attention

Group = tuple[list[int], list[list[int]]]  # (prefix ids, children ids); every child non-empty
HEAD_CHUNK = 512  # positions per head call: bounds the (N, V) float logits in memory


def can_pack(model) -> bool:
    """Whether the model can run packed rows with shared prefixes (sdpa attention, real tokens only)."""
    return getattr(unwrap(model).config, "_attn_implementation", None) == "sdpa" and not is_prompt_learning(model)


def split_common_prefix(prompts: list[list[int]]) -> Group:
    """The leading tokens all prompts share (leaving each at least one token of its own), and the rests."""
    limit = min(len(p) for p in prompts) - 1
    first, k = prompts[0], 0
    while k < limit and all(p[k] == first[k] for p in prompts):
        k += 1
    return first[:k], [p[k:] for p in prompts]


def _packed_inputs(groups: list[Group]) -> tuple[list[int], list[int], list[tuple[int, int, int]]]:
    """One row: ids, position ids and, per child, (row, column of its prefix's last token or -1, its first column).
    A child after another one restarts at position len(prefix): packed_attention reads that as "attends
    to the first len(prefix) tokens of the run that started at 0", i.e. its own prefix."""
    ids, pos, places = [], [], []
    for prefix, children in groups:
        start, p = len(ids), len(prefix)
        ids += prefix
        pos += range(p)
        for child in children:
            places.append((0, start + p - 1 if p else -1, len(ids)))
            ids += child
            pos += range(p, p + len(child))
    return ids, pos, places


def _hidden(model, groups: list[Group], packed: bool, pad_id: int):
    """Final hidden states (R, T, H) and, per child in group order, (row, prefix-end column, child column)."""
    backbone, head = lm_head_and_backbone(model)
    device = next(model.parameters()).device
    if packed:
        ids, pos, places = _packed_inputs(groups)
        with packed_attention(unwrap(model).config, shared_prefix=True):
            hidden = backbone(input_ids=torch.tensor([ids], device=device),
                              position_ids=torch.tensor([pos], device=device))  # (1, T, H)
        return hidden, head, places
    pairs = [(prefix, child) for prefix, children in groups for child in children]
    rows = [prefix + child for prefix, child in pairs]
    places = [(r, len(prefix) - 1, len(prefix)) for r, (prefix, _) in enumerate(pairs)]  # -1: no prefix
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, T) right-padded
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (R, T)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row)
        attention_mask[r, : len(row)] = 1
    hidden = backbone(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))  # (R, T, H)
    return hidden, head, places


def _logps_at(hidden, head, spots: list[tuple[int, int]], targets: list[list[int]]) -> list[list[float]]:
    """Log-probabilities of targets[i] as the next token after position spots[i] = (row, column)."""
    out = []
    for i in range(0, len(spots), HEAD_CHUNK):
        rows, cols = zip(*spots[i: i + HEAD_CHUNK])
        index = torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)
        logits = head(hidden[index]).float()  # (N, V)
        logps = logits.log_softmax(-1).cpu()
        out += [logps[j, t].tolist() for j, t in enumerate(targets[i: i + HEAD_CHUNK])]
    return out


@torch.no_grad()
def next_token_logps(model, groups: list[Group], token_ids: list[list[int]], packed: bool,
                     pad_id: int = 0) -> list[list[float]]:
    """Per child (group order): log-probabilities of token_ids[i] as the next token after prefix + child."""
    hidden, head, places = _hidden(model, groups, packed, pad_id)
    children = [c for _, kids in groups for c in kids]
    spots = [(row, start + len(child) - 1) for (row, _, start), child in zip(places, children)]
    return _logps_at(hidden, head, spots, token_ids)


@torch.no_grad()
def continuation_logps(model, groups: list[Group], packed: bool, pad_id: int = 0) -> list[list[float]]:
    """Per child (group order): the log-probability of each of its tokens after the prefix and the child's
    own earlier tokens. Prefixes must be non-empty (their last token predicts each child's first)."""
    hidden, head, places = _hidden(model, groups, packed, pad_id)
    children = [c for _, kids in groups for c in kids]
    spots, targets = [], []
    for (row, prefix_end, start), child in zip(places, children):
        if prefix_end < 0:
            raise ValueError("a continuation needs a non-empty prefix to be predicted from")
        spots += [(row, prefix_end)] + [(row, start + j) for j in range(len(child) - 1)]
        targets += [[t] for t in child]
    flat = [row[0] for row in _logps_at(hidden, head, spots, targets)]
    out, at = [], 0
    for child in children:
        out.append(flat[at: at + len(child)])
        at += len(child)
    return out
