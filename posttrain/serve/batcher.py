"""Continuous batching for the serving engine: requests join a running batch between decode steps.

The engine's worker thread owns a `Batcher`. Every `step()` first prefills the jobs that arrived since the
last one (one batched forward, merged into the running KV cache, models/decode.RaggedBatch), then takes
one token for every running row. A row leaves the batch as soon as it ends (a stop token, a stop
string, its own max_new_tokens, or its client went away) and a job gets its answer once all its rows
have ended: a short request that arrives while a long one runs is not held until the long one ends, and
no step computes a finished row.

Greedy jobs take the argmax (their answer does not depend on their batch); while only greedy rows run, the step
picks it without the logits (models/greedy_head.py, from the engine's bfloat16 copy of the head). Sampled rows
go through generate's warpers, batched per setting, and draw by the inverse CDF from one uniform each, taken from
their job's own torch.Generator: one batched draw per step (per-job `multinomial` calls made sampled
serving 0.81x slower than without the batcher), and no use of torch's global stream. A streamed job's
rows send their text as it comes (the same TextStreamer word holding and stop-string filter as a streamed
`generate`), choices interleaved. Seeded
jobs (their seed means generate's global stream: samples equal `generate_from_ids(seed=...)`), scoring
and image jobs run as before (engine.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from posttrain.models.decode import RaggedBatch
from posttrain.models.generate import CallbackStreamer, Generation, pad_id_of, stop_token_ids, to_generation
from posttrain.models.sampling import draw_by_uniforms, stop_hit, warped_probs
from posttrain.serve.jobs import Job, StopFilter, _Halt


@dataclass
class _Row:
    job: Job
    ids: list[int]
    index: int = 0  # which of the job's n choices
    stream: _Stream | None = None  # set for a streamed job: where its text goes


class _Stream:
    """One streamed row: tokens -> words (TextStreamer) -> stop-string filter -> the job's on_text."""

    def __init__(self, tokenizer, job: Job, index: int):
        self.pieces: list[str] = []
        self.halted = False  # a stop string was hit (or the client left): the row ends here

        def emit(text: str) -> None:
            self.pieces.append(text)
            job.on_text(index, text)

        self.filter = StopFilter(job.sampling.stop, emit)
        self.streamer = CallbackStreamer(tokenizer, self.filter.feed)
        self.streamer.next_tokens_are_prompt = False  # only new tokens are ever put

    def put(self, token: int) -> None:
        self._guard(lambda: self.streamer.put(torch.tensor([token])))

    def end(self) -> None:
        self._guard(self.streamer.end)
        if not self.halted:
            self.filter.flush()

    def _guard(self, fn) -> None:
        if self.halted:
            return
        try:
            fn()
        except _Halt:
            self.halted = True


class Batcher:
    """Running rows of greedy jobs; `add` from the worker thread, then `step` until it is empty."""

    def __init__(self, model: nn.Module, tokenizer, max_rows: int):
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self.stops = stop_token_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.pad_id = pad_id_of(tokenizer, self.stops)
        self.waiting: deque = deque()
        # with a queue, admit once this many rows are free: a prefill call has a fixed cost (~0.7 of a decode step
        # of SmolLM2 on a 2-core CPU), and admitting one row whenever one row ends paid it ~50 times per 128 requests
        self.admit_rows = max(1, max_rows // 4)
        self._reset()
        self.prefills = self.jobs_skipped = self.jobs_stopped = 0

    @staticmethod
    def takes(job: Job) -> bool:
        return job.sampling.seed is None and job.score is None and not job.images

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
        tokens = self.tokens  # (B,)
        keep = []
        for k, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
            row.ids.append(token)
            job = row.job
            if row.stream is not None and token not in self.stops:
                row.stream.put(token)
            ended = token in self.stops or len(row.ids) >= job.sampling.max_new_tokens or job.cancelled or (
                self.hits[id(job)] is not None and self.hits[id(job)](row.ids)) or (
                row.stream is not None and row.stream.halted)
            if ended and row.stream is not None:
                row.stream.end()
            if not ended:
                keep.append(k)
            elif self._row_done(job):
                self._deliver(job)
        if len(keep) < len(self.rows):
            order = self.batch.drop(sorted(set(range(len(self.rows))) - set(keep)))
            self.rows, tokens = [self.rows[k] for k in order], tokens[order]
        if not self.rows:
            self.tokens = None
        elif self.generators:  # a sampled row runs: the logits
            self.tokens = self._pick(self.batch.step(tokens), self.rows)
        else:  # greedy rows only: the step picks (models/greedy_head.py)
            self.tokens = self.batch.step_greedy(tokens)

    def _pick(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """(B,) the next token of each of `rows` from their (B, V) logits: the argmax, or for sampled rows one
        batched inverse-CDF draw per sampling setting, each row's uniform from its job's own generator."""
        tokens = logits.argmax(-1)
        by_setting: dict[tuple[float, float], list[int]] = {}
        for k, row in enumerate(rows):
            if id(row.job) in self.generators:
                by_setting.setdefault((row.job.sampling.temperature, row.job.sampling.top_p), []).append(k)
        for (temperature, top_p), ks in by_setting.items():
            probs_of = self.warpers.get((temperature, top_p)) or self.warpers.setdefault(
                (temperature, top_p), warped_probs(self.model, temperature=temperature, top_p=top_p))
            uniforms = torch.stack([torch.rand((), generator=self.generators[id(rows[k].job)]) for k in ks])
            tokens[ks] = draw_by_uniforms(probs_of(logits[ks]), uniforms).to(tokens)
        return tokens

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
        self.tokens: torch.Tensor | None = None  # (B,) the running rows' next tokens
        self.open: dict[int, list[_Row]] = {}  # job id -> its rows (until all have ended)
        self.hits: dict[int, object] = {}  # job id -> its stop-string test
        self.done_rows: dict[int, int] = {}  # job id -> how many of its rows have ended
        self.generators: dict[int, torch.Generator] = {}  # job id -> its random stream (sampled jobs only)
        self.warpers: dict[tuple[float, float], object] = {}  # (temperature, top_p) -> logits -> probabilities

    def _admit(self) -> None:
        jobs, taken = [], len(self.rows)
        if taken and self.max_rows - taken < min(sum(job.n for job in self.waiting), self.admit_rows):
            return  # a full batch and a queue: gather freed rows for one larger prefill
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
        new = [_Row(job, [], i, _Stream(self.tokenizer, job, i) if job.on_text is not None else None)
               for job in jobs for i in range(job.n)]
        try:
            logits = self.batch.add([row.job.prompt_ids for row in new])
        except Exception:
            self.waiting.extendleft(reversed(jobs))  # back in line, so that fail() gives them the error
            raise
        self.prefills += 1
        for job in jobs:
            self.open[id(job)] = [r for r in new if r.job is job]
            self.hits[id(job)] = stop_hit(self.tokenizer, list(job.sampling.stop))
            if job.sampling.temperature > 0:  # unseeded: a fresh stream of its own
                self.generators[id(job)] = torch.Generator(device=self.device)
                self.generators[id(job)].seed()
        self.rows += new
        tokens = self._pick(logits, new)
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens])

    def _row_done(self, job: Job) -> bool:
        """Whether every row of `job` has now ended (each ended row is counted once)."""
        self.done_rows[id(job)] = self.done_rows.get(id(job), 0) + 1
        return self.done_rows[id(job)] == job.n

    def _deliver(self, job: Job) -> None:
        rows = self.open.pop(id(job))
        self.hits.pop(id(job))
        self.done_rows.pop(id(job))
        self.generators.pop(id(job), None)
        if job.cancelled:
            self.jobs_stopped += 1
        gens = [to_generation(self.tokenizer, r.ids, self.stops, self.pad_id, stop=list(job.sampling.stop),
                              max_new_tokens=job.sampling.max_new_tokens, strip=job.strip and r.stream is None)
                for r in rows]
        job.future.set_result([g if r.stream is None else self._streamed(r.stream, g) for r, g in zip(rows, gens)])

    def _streamed(self, stream: _Stream, gen: Generation) -> Generation:
        """A streamed row's reply: the text it sent (cut at a stop string), like engine._stream_one's."""
        text = "".join(stream.pieces)
        reason = "stop" if stream.halted else gen.finish_reason
        return Generation(text, self.tokenizer(text, add_special_tokens=False)["input_ids"], reason)
