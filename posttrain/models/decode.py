"""The decode loop under `models/generate.py`: a KV cache whose rows join and leave between steps.

`RaggedBatch` holds the running rows in one left-padded `DynamicCache` whose layers append into spare
capacity (`GrowingLayer`, models/kv_cache.py, not a copy of the whole cache per step): new prompts are prefilled
(models/prefill.py plans how) and merged in (the shorter side padded on the left), finished rows leave in
place (the last rows move into their places), and leading columns that no remaining row uses are
dropped, so no step computes a finished row or a column nobody attends to. `decode` runs a fixed set of
prompts to the end with it; the serving engine drives it step by step so requests join a running batch
(continuous batching).

Why our own loop rather than the engines in transformers 5.23: `model.generate` keeps computing every
row until the last one stops (21% of the row-steps of a batch of 8 chat prompts at 64 new tokens are
finished rows) and cannot take a row in mid-run, which the serving engine needs. `generate_batch`
(continuous batching over a paged cache) gives the same greedy tokens but took 27-42 s for 8 prompts
x 16 tokens on the 2-layer tiny model on this 2-core CPU, mostly setting itself up, and takes one
GenerationConfig per call (no per-row seeded sampler, no per-request stop strings or streaming hooks).
torch.compile was tried on the hand-written step below (inductor, dynamic shapes, the oneDNN products as an
opaque custom op, as the packed weight does not lower): about 24 ms against 22 eager for a batch-8 SmolLM2 step,
its guards costing more than the fused pointwise kernels save; most of a step is its linear layers streaming the
fp32 weights, which run through oneDNN while `decode` runs (models/onednn_linear.py). Prefill is always the
model's own forward (on a CPU one packed row of all prompts: models/flat_prefill.py), with the positions HF
computes (position = count of real tokens before, as in `generate`); a decode step is too, except for
Llama-family models on a CPU, whose steps run `models/decode_step.py` (HF's computation in fewer ops); there a
greedy call's steps return the argmax without the logits, from a bfloat16 copy of the LM head with the float32
logits of every token that could win recomputed (models/greedy_head.py). Greedy outputs match `generate`
(tests/models/test_generate_engine.py, tests/models/test_flat_prefill.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from posttrain.models.decode_step import DecodeStep
from posttrain.models.flat_prefill import flat_prefill, flat_prefill_ok
from posttrain.models.kv_cache import growing_cache
from posttrain.models.onednn_linear import onednn_linears
from posttrain.models.prefill import PREFILL_CALL_TOKENS_CPU, PrefixStore, common_prefix, prefill_groups

# pick(logits (b, V) float, rows: prompt index of each batch row) -> next tokens (b,)
Picker = Callable[[torch.Tensor, list[int]], torch.Tensor]


def greedy(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The greedy Picker. `decode` knows it: its steps then pick the argmax themselves, without the logits."""
    return logits.argmax(-1)


def lean_decode_ok(model: nn.Module) -> bool:
    """Whether `decode` can run `model`: a decoder-only LM whose cache is plain full attention (no sliding
    window, no prompt-learning PEFT that injects its own cache)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    try:
        layers = DynamicCache(config=config.get_text_config()).layers
    except Exception:  # noqa: BLE001 - a config the cache cannot read: let HF generate handle it
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT forwards **kwargs
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class RaggedBatch:
    """Rows at different lengths in one left-padded KV cache. mask (B, T) long: 1 on real tokens."""

    def __init__(self, model: nn.Module, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.keep_last = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (B, T)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) position of each row's last token
        # a forward call's fixed cost in padded prompt tokens (prefill_groups); on a GPU padding is nearly free
        self.prefill_call_tokens = PREFILL_CALL_TOKENS_CPU if self.device.type == "cpu" else 1 << 20
        self.prefixes = PrefixStore()  # shared prompt prefixes' KV, for this batch's lifetime (fixed weights)
        self.lean: DecodeStep | bool | None = None  # models/decode_step.py, looked for at the first step

    def __len__(self) -> int:
        return self.mask.shape[0]

    def add(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill `prompts` and append them as the last rows, in order; (n, V) float logits of their last tokens.
        A repeated prompt is prefilled once; a prefix that every prompt shares (a chat template's system turn) is
        prefilled once and kept for later calls (models/prefill.py). On a CPU the prompts go in one packed row
        without padding (models/flat_prefill.py) unless a stored prefix makes padded calls cheaper; elsewhere
        prompts of very different lengths are prefilled in length groups (`prefill_groups`), not padded to the
        longest one."""
        unique = list(dict.fromkeys(tuple(p) for p in prompts))
        new = RaggedBatch(self.model, self.pad_id)
        if self._flat_pays(unique):
            logits, order = new._prefill_flat(unique, self.prefixes), range(len(unique))
        else:
            shared = self._shared_prefix(unique)
            skip = len(shared[0]) if shared else 0
            groups = prefill_groups([len(p) - skip for p in unique], self.prefill_call_tokens)
            logits = torch.cat([new._prefill([unique[i] for i in group], shared) for group in groups])
            order = [i for group in groups for i in group]  # grouped order
        row_of = {unique[i]: row for row, i in enumerate(order)}
        where = [row_of[tuple(p)] for p in prompts]  # prompt index -> its row in grouped order
        if where != list(range(len(where))):
            new.keep(where)
            logits = logits[where]
        self._merge(new.cache, new.mask, new.positions)
        return logits

    def _flat_pays(self, prompts: list[tuple[int, ...]]) -> bool:
        """Whether one packed row is this prefill's cheapest plan where it can run: always, unless a stored prefix
        leaves less to compute in padded calls (counted in padded tokens plus `prefill_call_tokens` a call; the
        packed row computes the prefix again)."""
        if not flat_prefill_ok(self.model, prompts):
            return False
        shortest = min(map(len, prompts)) - 1
        found = self.prefixes.find(prompts, shortest)
        if found is None:
            return True
        rest = [len(p) - len(found) for p in prompts]
        groups = prefill_groups(rest, self.prefill_call_tokens)
        padded = sum(len(group) * max(rest[i] for i in group) for group in groups)
        packed = sum(map(len, prompts)) - (len(prompts) - 1) * common_prefix(prompts, shortest)  # the row's tokens
        return packed < padded + (len(groups) - 1) * self.prefill_call_tokens  # one call against len(groups)

    def _shared_prefix(self, prompts: list[tuple[int, ...]]) -> tuple[tuple[int, ...], list] | None:
        """(prefix, its per-layer (keys, values) of one row) to prefill `prompts` on, or None: a stored prefix
        they all start with, else their common prefix when prefilling it once saves more than a call costs."""
        shortest = min(map(len, prompts)) - 1  # every row prefills at least its last token (its logits)
        found = self.prefixes.find(prompts, shortest)
        if found is not None:
            return found, self.prefixes[found]
        n = common_prefix(prompts, shortest)
        if (len(prompts) - 1) * n <= self.prefill_call_tokens:
            return None
        key = prompts[0][:n]
        cache = growing_cache(self.model.config.get_text_config())
        ids = torch.tensor([key], device=self.device)  # (1, n)
        self.model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True,
                   **self.keep_last)
        self.prefixes.put(key, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
        return key, self.prefixes[key]

    def _prefill(self, prompts: list[tuple[int, ...]], shared: tuple[tuple[int, ...], list] | None = None,
                 ) -> torch.Tensor:
        """Prefill `prompts` as one left-padded batch (after `shared`'s prefix, when given, whose KV is reused)
        and append them as the last rows; (n, V) float logits."""
        skip = len(shared[0]) if shared else 0
        rest = [p[skip:] for p in prompts]
        width = max(len(p) for p in rest)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in rest], device=self.device)  # (n, W)
        mask = torch.tensor([[1] * skip + [0] * (width - len(p)) + [1] * len(p) for p in rest],
                            device=self.device)  # (n, skip + W): the prefix, padding, each prompt's own tokens
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, skip:]  # (n, W) as generate computes them
        cache = growing_cache(self.model.config.get_text_config())
        if shared:
            for layer, (keys, values) in zip(cache.layers, shared[1]):
                layer.start_from(keys.expand(len(rest), -1, -1, -1), values.expand(len(rest), -1, -1, -1))
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, **self.keep_last).logits[:, -1].float()  # (n, V)
        self._merge(cache, mask, positions[:, -1])
        return logits

    def _prefill_flat(self, prompts: list[tuple[int, ...]], store: PrefixStore) -> torch.Tensor:
        """Prefill `prompts` as one packed row (models/flat_prefill.py) and append them as the last rows; their
        common prefix goes to `store` when later calls would gain from it (the rule of `_shared_prefix`)."""
        logits, rows, mask, positions, n, prefix = flat_prefill(self.model, prompts, bool(self.keep_last))
        if (len(prompts) - 1) * n > self.prefill_call_tokens:
            store.put(prompts[0][:n], [(keys.clone(), values.clone()) for keys, values in prefix])
        cache = growing_cache(self.model.config.get_text_config())
        for layer, (keys, values) in zip(cache.layers, rows):
            layer.start_from(keys, values)
        self._merge(cache, mask, positions)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); (B, V) float logits of the next one."""
        lean = self._advance()
        if lean:
            return lean.step(tokens.view(-1).to(self.device), self.mask, self.positions, self.cache)
        return self._forward(tokens)

    def step_greedy(self, tokens: torch.Tensor) -> torch.Tensor:
        """As `step`, but (B,) the argmax of each row's logits (models/greedy_head.py where it applies)."""
        lean = self._advance()
        if lean:
            return lean.greedy(tokens.view(-1).to(self.device), self.mask, self.positions, self.cache)
        return self._forward(tokens).argmax(-1)

    def _advance(self) -> DecodeStep | bool:
        """Move the mask and positions on by one token; the hand-written step if the model allows it (checked
        once: False)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        self.positions = self.positions + 1
        if self.lean is None or (self.lean and not self.lean.still_valid()):
            self.lean = DecodeStep.of(self.model) or False
        return self.lean

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens.view(-1, 1).to(self.device), attention_mask=self.mask,
                         position_ids=self.positions[:, None], past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].float()

    def drop(self, ended: list[int]) -> list[int]:
        """Remove these rows; the last remaining rows take their places, so only as many rows are copied as
        ended (keeping the order moved every row after the first gap: a third of a 32-row decode step). Returns
        the remaining rows' old indices in their new order."""
        gone = set(ended)
        order = list(range(len(self) - len(gone)))
        holes = [row for row in sorted(gone) if row < len(order)]
        movers = [row for row in range(len(order), len(self)) if row not in gone]
        for hole, row in zip(holes, movers):
            order[hole] = row
        self.keep(order)
        return order

    def keep(self, rows: list[int]) -> None:
        """Keep only these batch rows (in this order), then trim columns that no kept row attends to."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        if len(rows) <= len(self):  # in place
            for layer in self.cache.layers:
                layer.keep_rows(rows)
        else:  # repeated rows (add)
            self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        lead = int(self.mask.any(0).long().argmax()) if len(rows) else 0  # leading all-padding columns
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.drop_leading(lead)

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if self.cache is None or not len(self):
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        extra_old, extra_new = max(0, mask.shape[1] - self.mask.shape[1]), max(0, self.mask.shape[1] - mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):  # (B, H, T, D): pad the shorter side on the left
            old.keys, new.keys = _pad_left(old.keys, extra_old, 2), _pad_left(new.keys, extra_new, 2)
            old.values, new.values = _pad_left(old.values, extra_old, 2), _pad_left(new.values, extra_new, 2)
            old.keys, old.values = torch.cat([old.keys, new.keys]), torch.cat([old.values, new.values])
        self.mask = torch.cat([_pad_left(self.mask, extra_old, 1), _pad_left(mask, extra_new, 1)])
        self.positions = torch.cat([self.positions, positions])


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if not n:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


@torch.no_grad()
def decode(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int], pad_id: int,
           pick: Picker, stop_hit: Callable[[list[int]], bool] | None = None,
           on_tokens: Callable[[list[int], torch.Tensor], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> list[list[int]]:
    """New tokens of every prompt: up to and including its stop token, or up to the token that completed a
    stop string (`stop_hit(ids)`), or `max_new_tokens` of them. `on_tokens(rows, tokens)` sees each step's
    tokens (streaming); `should_stop()`, asked after every step, ends all rows (a cancelled request)."""
    out: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens <= 0:
        return out
    model.eval()
    # weights fixed for the call: their oneDNN copies made once; greedy steps' head in bfloat16 (models/greedy_head.py)
    with onednn_linears(model, head="greedy" if pick is greedy else "float32"):
        batch = RaggedBatch(model, pad_id)
        rows = list(range(len(prompts)))  # batch row -> prompt index
        tokens = pick(batch.add(prompts), rows)  # (b,)
        stops = set(stop_ids)
        while True:
            live = []
            for k, (row, token) in enumerate(zip(rows, tokens.tolist())):
                out[row].append(token)
                done = (token in stops or len(out[row]) >= max_new_tokens
                        or (stop_hit is not None and stop_hit(out[row])))
                if not done:
                    live.append(k)
            if on_tokens is not None:
                on_tokens(rows, tokens)
            if not live or (should_stop is not None and should_stop()):
                return out
            if len(live) < len(rows):
                order = batch.drop(sorted(set(range(len(rows))) - set(live)))
                tokens, rows = tokens[order], [rows[k] for k in order]
            tokens = batch.step_greedy(tokens) if pick is greedy else pick(batch.step(tokens), rows)
