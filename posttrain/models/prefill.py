"""How a batch of prompts is prefilled on a CPU: in length groups, and on a shared prefix computed once.

Prefill is compute-bound (SmolLM2-135M: ~1 ms a prompt token at 32 rows on the project's 2-core CPUs), so the
tokens it runs are its cost, plus a fixed cost per forward call (its pass over the weights and python: ~70 ms,
`PREFILL_CALL_TOKENS_CPU` tokens' worth). Left padding to the longest prompt runs tokens nobody needs, and
every chat prompt starts with the same template tokens (SmolLM2's default system turn and user header: 24 of
an alpaca prompt's 45.6 tokens on average). `prefill_groups` splits a call by length where that saves more than
a call costs; `PrefixStore` keeps the KV of a prefix every prompt of a call shared, so the serving engine computes its
template's system turn once. Plans only: models/decode.RaggedBatch runs them. Where the model allows it, a CPU
prefill without a stored prefix runs no padding at all (one packed row: models/flat_prefill.py); the length groups
are for the rest (a GPU, other model families, prompts that a stored prefix makes cheaper to pad).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

# One prefill call costs about as much as this many more padded prompt tokens in a call, on the 2-core CPUs that
# benchmarks/serve_speed.py ran on: SmolLM2-135M prefills ~1 ms a token at 32 rows, a forward's weight pass
# and python take ~70 ms (one 46-token prompt: 109 ms).
PREFILL_CALL_TOKENS_CPU = 64


def prefill_groups(lengths: list[int], call_tokens: int) -> list[list[int]]:
    """Prompt indices in prefill calls, each call padded to its longest prompt: the split by length that costs the
    fewest padded tokens plus `call_tokens` per call (exact, by dynamic programming over the sorted lengths). 32
    chat prompts of 35-90 tokens padded to 90 are half padding; split, the padding nearly goes."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)  # best[j]: cost of the j shortest
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[j - 1]] + call_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]: j])
        j = cut[j]
    return groups[::-1]


def common_prefix(prompts: Sequence[Sequence[int]], limit: int) -> int:
    """How many leading tokens all `prompts` share, at most `limit`."""
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


class PrefixStore(OrderedDict):
    """prefix tokens -> its per-layer KV of one row; the `size` most recently used."""

    def __init__(self, size: int = 4):
        super().__init__()
        self.size = size

    def find(self, prompts: Sequence[tuple[int, ...]], limit: int) -> tuple[int, ...] | None:
        """The longest stored prefix, at most `limit` tokens, that every prompt starts with."""
        fits = [key for key in self if len(key) <= limit and all(p[: len(key)] == key for p in prompts)]
        if not fits:
            return None
        key = max(fits, key=len)
        self.move_to_end(key)
        return key

    def put(self, key: tuple[int, ...], kv: list) -> None:
        self[key] = kv
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
