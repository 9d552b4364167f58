"""RL experience: sampled responses with their log-probs, values and rewards.

`sample` draws this process's share of a rollout batch (through the one generation layer, each row
with its own seed, so the draw does not depend on how the batch is split over processes); PPO's
`collect` adds log-probs, values and rewards; `gather` assembles the shares of every process into
the whole batch in global order.
Log-probs are taken at response positions only, so the prompt never materialises vocabulary-sized
logits. Every tensor field is named with its shape.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import nn

from posttrain.data.prompts import Prompt
from posttrain.losses.ppo import entropy_from_logits
from posttrain.models.generate import sample_ids
from posttrain.models.onednn_linear import onednn_linears
from posttrain.models.anatomy import lm_head_and_backbone


@dataclass
class Experience:
    """Sampled responses and what the models said about them. B rows, P prompt positions (left-padded),
    R response positions (right-padded)."""

    input_ids: torch.Tensor  # (B, P+R) prompt then response tokens
    attention_mask: torch.Tensor  # (B, P+R) bool, False on padding (both sides)
    response_mask: torch.Tensor  # (B, R) bool, True on sampled tokens up to and including the stop token
    ended: torch.Tensor  # (B,) bool, the response stopped on its own within the length limit
    old_token_logps: torch.Tensor  # (B, R) log pi_old(y_t) at sampling time
    ref_token_logps: torch.Tensor  # (B, R) log pi_ref(y_t), the frozen SFT model
    old_values: torch.Tensor  # (B, R) V(s_t) at sampling time
    entropy: torch.Tensor  # (B, R) policy entropy at each response position
    scores: torch.Tensor  # (B,) raw reward of each response

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]


@dataclass
class Samples:
    """Sampled responses as one batch: B rows, P prompt positions (left-padded), R response positions."""

    input_ids: torch.Tensor  # (B, P+R) prompt then response tokens
    attention_mask: torch.Tensor  # (B, P+R) bool, False on padding (both sides)
    response_mask: torch.Tensor  # (B, R) bool, True on sampled tokens up to and including the stop token
    ended: torch.Tensor  # (B,) bool, the response stopped on its own within the length limit
    texts: list[str]  # the decoded responses (special tokens skipped)


@dataclass
class Rollout:
    """What a PPO update reads: one rollout batch with advantages. Shapes as in Experience."""

    input_ids: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R) bool
    response_mask: torch.Tensor  # (B, R) bool
    old_token_logps: torch.Tensor  # (B, R)
    ref_token_logps: torch.Tensor  # (B, R)
    old_values: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B, R) GAE advantages (whitened when configured)
    returns: torch.Tensor  # (B, R) value targets: advantages + values (before whitening)

    def select(self, index: torch.Tensor) -> Rollout:
        """The rollouts at `index` (a mini-batch)."""
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def prompt_indices(n_prompts: int, step: int, batch: int, seed: int) -> list[int]:
    """The prompts of RL step `step` (0-based): a seeded reshuffle per pass, so resume is exact."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(pos, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[k]))
    return out


def row_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of row `position` of RL step `step`: the same on whichever process samples it."""
    return (seed * 1_000_003 + step) * 65_537 + position


class PolicyAndValue(nn.Module):
    """The policy (LoRA or full) with a scalar value head, on its own backbone or a separate critic; and the frozen
    reference copy when there is one (held here so that the engine shards it like the policy: reference_model.py)."""

    def __init__(self, policy: nn.Module, hidden_size: int, critic: nn.Module | None = None,
                 frozen_reference: nn.Module | None = None):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.frozen_reference = frozen_reference.eval().requires_grad_(False) if frozen_reference is not None else None
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
        return adapter_disabled(self.policy)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_reference is not None:
            self.frozen_reference.eval()  # never trains, whatever the loop asks
        return self


def adapter_disabled(policy: nn.Module):
    """Context in which a PEFT policy computes its base model (adapters off); a plain model is unchanged."""
    disable = getattr(policy, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


@contextlib.contextmanager
def merged_lora(policy: nn.Module, synced: bool):
    """Sampling with LoRA merged: each adapted layer's base weight is swapped for a merged copy (W + s B A) and
    the adapters are switched off, so a decode step runs one GEMM per linear instead of PEFT's three plus an add
    (13% of a GRPO rollout on a CPU). The original tensors go back afterwards, untouched: merging in place and
    unmerging would leave the frozen base off by a rounding at every step, and resumed runs would no longer
    equal uninterrupted ones. Only for plain PEFT LoRA over fp32 or bf16 base weights this process holds whole
    (not sharded, not quantized), and only where the copies fit (always on a CPU; on a GPU when free memory
    holds twice their size). Anything else samples as it is."""
    peft_config = getattr(policy, "active_peft_config", None)
    if peft_config is None or synced:
        yield
        return
    from peft import PeftType  # heavy: peft, ~3 s; only for a policy that has adapters
    from peft.tuners.lora import LoraLayer  # heavy: with peft above

    layers = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    bases = [m.get_base_layer() for m in layers]
    ok = (peft_config.peft_type == PeftType.LORA and bool(layers) and not any(m.merged for m in layers)
          and all(len(m.active_adapters) == 1 for m in layers)
          and all(b.weight.dtype in (torch.float32, torch.bfloat16) for b in bases))
    if ok and bases[0].weight.is_cuda:
        need = sum(b.weight.numel() * b.weight.element_size() for b in bases)
        ok = torch.cuda.mem_get_info(bases[0].weight.device)[0] > 2 * need
    if not ok:
        yield
        return
    originals = [b.weight.data for b in bases]
    with torch.no_grad():
        for m, b in zip(layers, bases):
            (name,) = m.active_adapters
            b.weight.data = b.weight.data + m.get_delta_weight(name).to(b.weight.dtype)
    try:
        with policy.disable_adapter():
            yield
    finally:
        for b, w in zip(bases, originals):
            b.weight.data = w


@contextlib.contextmanager
def sampling_weights(policy: nn.Module, synced: bool):
    """The policy as sampling runs it: outside the run's autocast where the weights share one dtype (autocast
    would cast every frozen weight again at each decode step, as it caches only trainable leaves: GRPO's bf16
    sampling was slower than fp32 on a CPU with AMX, benchmarks/README.md; mixed storage, a bf16 base under
    fp32 trainable blocks, needs autocast to run at all), with LoRA merged (`merged_lora`) and, on a CPU, the
    merged weights' oneDNN copies made once for every generate call inside (models/onednn_linear.py)."""
    device = next(policy.parameters()).device
    one_dtype = len({p.dtype for p in policy.parameters() if p.is_floating_point()}) == 1
    with torch.autocast(device.type, enabled=False) if one_dtype else contextlib.nullcontext(), \
            merged_lora(policy, synced), onednn_linears(policy):
        yield


@torch.no_grad()
def sample(policy: nn.Module, tokenizer, prompts: list[Prompt], seeds: list[int], sampling_cfg,
           synced: bool = False) -> Samples:
    """One response per prompt, row i drawn with seed seeds[i]; sampling_cfg has max_new_tokens, temperature,
    top_p and stop_strings (ppo.* or grpo.*); synced: see models/generate.py."""
    c = sampling_cfg
    device = next(policy.parameters()).device
    with sampling_weights(policy, synced):
        s = sample_ids(policy, tokenizer, [q.ids for q in prompts], max_new_tokens=c.max_new_tokens,
                       temperature=c.temperature, top_p=c.top_p, row_seeds=seeds,
                       stop_strings=c.stop_strings or None, synced=synced)
    texts = [tokenizer.decode(ids[m], skip_special_tokens=True) for ids, m in zip(s.response_ids, s.response_mask)]
    return Samples(torch.cat([s.prompt_ids, s.response_ids], 1).to(device),  # (B, P+R)
                   torch.cat([s.prompt_mask, s.response_mask], 1).to(device), s.response_mask.to(device),
                   s.ended.to(device), texts)


@torch.no_grad()
def collect(pv: PolicyAndValue, tokenizer, prompts: list[Prompt], seeds: list[int], ppo_cfg, reward_fn,
            synced: bool = False) -> tuple[Experience, list[str]]:
    """Sample one response per prompt (row i with seed seeds[i]), then log-probs, values, reference
    log-probs (pv's frozen copy, else the policy with its adapter off) and raw rewards. Returns the experience
    and the decoded responses.

    synced: every process samples at once with sharded weights (see models/generate.py)."""
    p = ppo_cfg
    s = sample(pv.policy, tokenizer, prompts, seeds, p, synced=synced)
    input_ids, attention_mask, responses = s.input_ids, s.attention_mask, s.texts
    device = input_ids.device
    width = s.response_mask.shape[1]
    pv.eval()
    old_logps, old_values, entropy = pv(input_ids, attention_mask, width, p.temperature)
    if pv.frozen_reference is None:
        with pv.reference():
            ref_logps = pv(input_ids, attention_mask, width, p.temperature, values=False)[0]
    else:
        ref = PolicyAndValue(pv.frozen_reference, 1)
        ref_logps = ref(input_ids, attention_mask, width, p.temperature, values=False)[0]
    scores = torch.tensor(reward_fn([q.text for q in prompts], responses), dtype=torch.float32, device=device)
    return Experience(input_ids, attention_mask, s.response_mask, s.ended, old_logps,
                      ref_logps, old_values, entropy, scores), responses


def gather(exp, dist_ctx, pad_id: int):
    """Every process's share (equal row counts) of a rollout dataclass (Experience, or a stage's own with
    input_ids, attention_mask and response_mask) in one batch, in global order: row k of process r is
    global row k * world + r. Prompt parts are left-padded and (B, R) fields right-padded to common
    widths; fields that are None stay None (on every process alike)."""
    if dist_ctx.world == 1:
        return exp
    response_len = exp.response_mask.shape[1]
    widths = torch.tensor([exp.input_ids.shape[1] - response_len, response_len], device=exp.input_ids.device)
    dist.all_reduce(widths, op=dist.ReduceOp.MAX)
    prompt_w, response_w = widths.tolist()
    out = {}
    for f in fields(exp):
        t = getattr(exp, f.name)
        if t is None:
            out[f.name] = None
            continue
        if f.name in ("input_ids", "attention_mask"):
            prompt, response = t[:, :t.shape[1] - response_len], t[:, t.shape[1] - response_len:]
            fill = pad_id if f.name == "input_ids" else False
            t = torch.cat([_pad(prompt, prompt_w, fill, left=True), _pad(response, response_w, fill)], 1)
        elif t.dim() == 2:
            t = _pad(t, response_w, False if t.dtype == torch.bool else 0)
        out[f.name] = gather_rows(t, dist_ctx)
    return type(exp)(**out)


def gather_rows(t: torch.Tensor, dist_ctx) -> torch.Tensor:
    """(B_local, ...) of equal shape on every process -> (B, ...) in global order (row k of process r is
    global row k * world + r)."""
    if dist_ctx.world == 1:
        return t
    wire = t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()  # gloo gathers no bools
    parts = [torch.empty_like(wire) for _ in range(dist_ctx.world)]
    dist.all_gather(parts, wire)
    return torch.stack(parts, 1).flatten(0, 1).to(t.dtype)  # (B_local, world, ...) -> global order


def _pad(t: torch.Tensor, width: int, fill, left: bool = False) -> torch.Tensor:
    extra = torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([extra, t] if left else [t, extra], 1)
