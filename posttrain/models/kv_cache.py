"""The KV cache of the decode loop (models/decode.py): layers that append into spare capacity, and leave rows and
leading columns in place."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into spare capacity instead of concatenating: `DynamicLayer.update` copies the
    whole cache at every decode step (torch.cat), 16% of a 32-row rollout's time on a CPU. keys / values are
    views of positions start..end of a buffer with room for more. Rows that leave (`keep_rows`) and leading
    columns nobody attends to (`drop_leading`) go in place, so the next append does not copy the cache again
    (a row selection by indexing, then a regrow, cost two copies of it); anything that assigns keys / values
    (merging) hands over a tensor without spare room, and the next append regrows it once."""

    def __init__(self):
        self._buffers = {"keys": (None, 0, 0), "values": (None, 0, 0)}  # (buffer (B, H, capacity, D), start, end)
        super().__init__()

    def _view(self, name: str):
        buf, start, end = self._buffers[name]
        return buf if buf is None else buf[:, :, start:end]

    def _assign(self, name: str, x) -> None:
        self._buffers[name] = (x, 0, 0 if x is None else (x.shape[-2] if x.dim() == 4 else 0))

    keys = property(lambda self: self._view("keys"), lambda self, x: self._assign("keys", x))
    values = property(lambda self: self._view("values"), lambda self, x: self._assign("values", x))

    def _append(self, name: str, new: torch.Tensor) -> torch.Tensor:
        buf, start, end = self._buffers[name]
        n, add = end - start, new.shape[-2]
        if buf is None or buf.dim() != 4 or end + add > buf.shape[-2] or buf.shape[:2] != new.shape[:2]:
            grown = new.new_empty(*new.shape[:2], n + add + max(64, (n + add) // 2), new.shape[-1])  # (B, H, cap, D)
            if n:
                grown[:, :, :n] = buf[:, :, start:end]
            buf, start, end = grown, 0, n
        buf[:, :, end:end + add] = new
        self._buffers[name] = (buf, start, end + add)
        return buf[:, :, start:end + add]

    def keep_rows(self, rows: list[int]) -> None:
        """Keep these batch rows, in this order, in place: only rows whose place changes are copied."""
        moved = [i for i, row in enumerate(rows) if row != i]
        for name, (buf, start, end) in list(self._buffers.items()):
            if buf is None or buf.dim() != 4:
                continue
            if moved:  # the right side is gathered before anything is written
                buf[moved, :, start:end] = buf[[rows[i] for i in moved], :, start:end]
            self._buffers[name] = (buf[: len(rows)], start, end)

    def crop(self, tokens_to_remove: int) -> None:
        """`DynamicLayer.crop` in place: forget the last -tokens_to_remove positions (transformers 5 takes <= 0)."""
        if tokens_to_remove > 0 or not self.is_initialized:
            return super().crop(tokens_to_remove)  # its error for a positive value
        for name, (buf, start, end) in list(self._buffers.items()):
            if buf is not None and buf.dim() == 4:
                self._buffers[name] = (buf, start, max(start, end + tokens_to_remove))

    def drop_leading(self, n: int) -> None:
        """Forget the first n positions (no copy)."""
        for name, (buf, start, end) in list(self._buffers.items()):
            if buf is not None and buf.dim() == 4:
                self._buffers[name] = (buf, start + n, end)

    def start_from(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Begin with these (B, H, T, D) states (a shared prefix's, expanded): the next append copies them once."""
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append("keys", key_states), self._append("values", value_states)


def growing_cache(config) -> DynamicCache:
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache
