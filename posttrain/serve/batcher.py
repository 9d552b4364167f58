"""Continuous batching for the serving engine: greedy requests join a running batch between decode steps.

The engine's worker thread owns a `Batcher`. Every `step()` first prefills the jobs that arrived since the
last one (one batched forward, merged into the running KV cache, models/decode.RaggedBatch), then takes
one greedy token for every running row. A row leaves the batch as soon as it ends (a stop token, a stop
string, its own max_new_tokens, or its client went away) and a job gets its answer once all its rows
have ended: a short request that arrives while a long one runs is not held until the long one ends, and
no step computes a finished row. Only greedy jobs join (their answer does not depend on their batch);
sampled, streamed, scoring and image jobs run as before (engine.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from posttrain.models.decode import RaggedBatch
from posttrain.models.generate import pad_id_of, stop_token_ids, to_generation
from posttrain.models.sampling import stop_hit
from posttrain.serve.jobs import Job


@dataclass
class _Row:
    job: Job
    ids: list[int]


class Batcher:
    """Running rows of greedy jobs; `add` from the worker thread, then `step` until it is empty."""

    def __init__(self, model: nn.Module, tokenizer, max_rows: int):
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self.stops = stop_token_ids(model, tokenizer)
        self.pad_id = pad_id_of(tokenizer, self.stops)
        self.waiting: deque = deque()
        self._reset()
        self.prefills = self.jobs_skipped = self.jobs_stopped = 0

    @staticmethod
    def takes(job: Job) -> bool:
        return job.sampling.temperature <= 0 and job.score is None and job.on_text is None and not job.images

    def add(self, job: Job) -> None:
        self.waiting.append(job)

    def __bool__(self) -> bool:
        return bool(self.rows or self.waiting)

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting jobs that fit, then one decode step for every row."""
        self._admit()
        if not self.rows:
            return
        tokens = self.logits.argmax(-1)  # (B,)
        keep = []
        for k, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
            row.ids.append(token)
            job = row.job
            ended = token in self.stops or len(row.ids) >= job.sampling.max_new_tokens or job.cancelled or (
                self.hits[id(job)] is not None and self.hits[id(job)](row.ids))
            if not ended:
                keep.append(k)
            elif self._row_done(job):
                self._deliver(job)
        if len(keep) < len(self.rows):
            self.batch.keep(keep)
            self.rows, tokens = [self.rows[k] for k in keep], tokens[keep]
        self.logits = self.batch.step(tokens) if self.rows else None

    def fail(self, err: Exception) -> None:
        """A forward failed: every running and waiting job gets the error; the batch starts afresh."""
        for job in {id(j): j for j in [r.job for r in self.rows] + list(self.waiting)}.values():
            if not job.future.done():
                job.future.set_exception(err)
        self.waiting.clear()
        self._reset()

    def _reset(self) -> None:
        self.model.eval()
        self.batch = RaggedBatch(self.model, self.pad_id)
        self.rows: list[_Row] = []
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of the running rows
        self.open: dict[int, list[_Row]] = {}  # job id -> its rows (until all have ended)
        self.hits: dict[int, object] = {}  # job id -> its stop-string test
        self.done_rows: dict[int, int] = {}  # job id -> how many of its rows have ended

    def _admit(self) -> None:
        jobs, taken = [], len(self.rows)
        while self.waiting and (taken + self.waiting[0].n <= self.max_rows or not taken):  # a big job runs alone
            job = self.waiting.popleft()
            if job.cancelled:  # its client left before it started: never run
                self.jobs_skipped += 1  # counted before the client's future wakes anyone
                job.future.cancel()
            else:
                jobs.append(job)
                taken += job.n
        if not jobs:
            return
        new = [_Row(job, []) for job in jobs for _ in range(job.n)]
        logits = self.batch.add([row.job.prompt_ids for row in new])
        self.prefills += 1
        for job in jobs:
            self.open[id(job)] = [r for r in new if r.job is job]
            self.hits[id(job)] = stop_hit(self.tokenizer, list(job.sampling.stop))
        self.rows += new
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    def _row_done(self, job: Job) -> bool:
        """Whether every row of `job` has now ended (each ended row is counted once)."""
        self.done_rows[id(job)] = self.done_rows.get(id(job), 0) + 1
        return self.done_rows[id(job)] == job.n

    def _deliver(self, job: Job) -> None:
        rows = self.open.pop(id(job))
        self.hits.pop(id(job))
        self.done_rows.pop(id(job))
        if job.cancelled:
            self.jobs_stopped += 1
        job.future.set_result([to_generation(self.tokenizer, r.ids, self.stops, self.pad_id,
                                              max_new_tokens=job.sampling.max_new_tokens,
                                              stop=list(job.sampling.stop), strip=job.strip) for r in rows])
