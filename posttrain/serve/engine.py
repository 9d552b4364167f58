"""The serving engine: one worker thread owns the model; requests queue up and run in batches.

HTTP handlers never touch the model. They submit a `Job` and wait on its Future, so 32 parallel
clients become a few `generate` calls of up to `max_batch` rows instead of 32 racing threads.
Jobs with equal sampling settings share a batch; a seeded job runs alone so its seed means the
same thing whatever else is queued. Streaming jobs run one at a time with a token callback.
A job whose client went away (`cancelled`) is skipped if it has not started, a generate call
stops between tokens once every job in it is cancelled, and a scoring job stops between responses,
so abandoned requests (a client that timed out and retried) do not pile up work the server can never
catch up with.
torch's sampling RNG is one per process, so sampling runs of all engines (the UI may hold several)
take turns on `_RNG_LOCK`; otherwise one engine's draws would shift another's seeded samples.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import nn

from posttrain.records import Conversation, Message
from posttrain.models.load import reward_offset
from posttrain.models.generate import CallbackStreamer, Generation, generate_from_ids
from posttrain.templates.render import Encoded, encode_conversation

log = logging.getLogger(__name__)
_RNG_LOCK = threading.Lock()  # held by every sampling (temperature > 0) generate call, across engines


class EngineClosed(RuntimeError):
    """The server is shutting down and takes no new work."""


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def batch_key(self) -> tuple:
        return (self.max_new_tokens, self.temperature, self.top_p, self.stop)


@dataclass
class Job:
    prompt_ids: list[int]
    n: int
    sampling: Sampling
    strip: bool = True  # chat replies are stripped like `posttrain chat`; raw completions are not
    on_text: Callable[[int, str], None] | None = None  # set: stream (choice index, piece), on the worker thread
    score: tuple[list[Message], list[str]] | None = None  # set: a scoring job, not generation
    future: Future = field(default_factory=Future)
    cancelled: bool = False  # the client went away: skip the job, or stop generating for it


class _Halt(Exception):
    """Raised inside a streamer to end a streamed generation early (stop string or cancelled job)."""


class StopFilter:
    """Forwards streamed text but holds back anything that may be the start of a stop string."""

    def __init__(self, stop: tuple[str, ...], emit: Callable[[str], None]):
        self.stop, self.emit, self.buffer, self.hit = [s for s in stop if s], emit, "", False

    def feed(self, piece: str) -> None:
        self.buffer += piece
        cuts = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.hit = True
            self._send(self.buffer[: min(cuts)])
            raise _Halt
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        ready, held = self.buffer[: len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        self._send(ready)
        self.buffer = held

    def flush(self) -> None:
        self._send(self.buffer)

    def _send(self, text: str) -> None:
        self.buffer = ""
        if text:
            self.emit(text)


class Engine:
    """Owns `model` on a worker thread; `submit` is safe from any thread."""

    def __init__(self, model: nn.Module, tokenizer, name: str, *, system: str | None = None,
                 max_batch: int = 32, batch_wait_s: float = 0.01):
        self.model, self.tokenizer, self.name, self.system = model, tokenizer, name, system
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.closing = False
        self.batches_run = 0  # generate calls made; tests read it to see that batching happened
        self.jobs_skipped = 0  # cancelled before they started: never run
        self.batches_stopped = 0  # generate calls (or scoring jobs) ended early because their jobs were cancelled
        self.thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        if self.closing:
            raise EngineClosed("the server is shutting down")
        self.queue.put(job)
        return job.future

    def close(self, timeout: float | None = 60) -> None:
        """Finish every queued job, then stop the worker (graceful shutdown)."""
        if not self.closing:
            self.closing = True
            self.queue.put(None)
        self.thread.join(timeout)

    # ------------------------------------------------------------------ worker thread

    def _loop(self) -> None:
        done = False
        while not done:
            first = self.queue.get()
            jobs = [] if first is None else [first]
            done = first is None
            deadline = time.monotonic() + self.batch_wait_s
            # Gather what arrives within a few ms: concurrent clients land in the same batch.
            while not done and len(jobs) < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    done = True
                else:
                    jobs.append(job)
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            if job.score is not None or job.on_text is not None or job.sampling.seed is not None:
                self._guarded(self._run_single, [job])
            else:
                groups.setdefault((job.sampling.batch_key(), job.strip), []).append(job)
        for group in groups.values():
            chunk: list[Job] = []
            for job in group:  # at most max_batch rows per generate call (n rows per job)
                if chunk and sum(j.n for j in chunk) + job.n > self.max_batch:
                    self._guarded(self._run_batch, chunk)
                    chunk = []
                chunk.append(job)
            self._guarded(self._run_batch, chunk)

    def _guarded(self, fn, jobs: list[Job]) -> None:
        """Run and deliver, skipping cancelled jobs; a failure goes to the waiting clients instead of
        killing the worker."""
        for job in [j for j in jobs if j.cancelled]:
            job.future.cancel()  # nobody waits for it; never set_running, so the cancel always takes
            self.jobs_skipped += 1
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        try:
            fn(jobs)
        except Exception as err:  # noqa: BLE001 - any model error belongs to these requests only
            log.exception("generation failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)

    def _generate(self, prompts: list[list[int]], sampling: Sampling, strip: bool, streamer=None,
                  jobs: list[Job] = ()) -> list[Generation]:
        """generate_from_ids; with `jobs`, it stops between tokens once all of them are cancelled."""
        self.batches_run += 1
        stopped: list[bool] = []

        def abandoned() -> bool:
            if not stopped and all(job.cancelled for job in jobs):
                stopped.append(True)
            return bool(stopped)

        with _RNG_LOCK if sampling.temperature > 0 else contextlib.nullcontext():  # greedy draws nothing
            gens = generate_from_ids(
                self.model, self.tokenizer, prompts, max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                stop=list(sampling.stop), strip=strip, streamer=streamer, should_stop=abandoned if jobs else None,
            )
        self.batches_stopped += len(stopped)
        return gens

    def _run_batch(self, jobs: list[Job]) -> None:
        prompts = [job.prompt_ids for job in jobs for _ in range(job.n)]
        gens = self._generate(prompts, jobs[0].sampling, jobs[0].strip, jobs=jobs)
        start = 0
        for job in jobs:
            job.future.set_result(gens[start:start + job.n])
            start += job.n

    def _run_single(self, jobs: list[Job]) -> None:
        job = jobs[0]
        if job.score is not None:
            scores = self._score(job)
            if scores is None:  # the client left mid-way: the rest of its responses are never scored
                job.future.cancel()
                self.batches_stopped += 1
            else:
                job.future.set_result(scores)
        elif job.on_text is None:
            job.future.set_result(self._generate([job.prompt_ids] * job.n, job.sampling, job.strip, jobs=jobs))
        else:
            job.future.set_result([self._stream_one(job, i) for i in range(job.n)])

    def _stream_one(self, job: Job, index: int) -> Generation:
        pieces: list[str] = []

        def emit(text: str) -> None:
            pieces.append(text)
            job.on_text(index, text)

        stop_filter = StopFilter(job.sampling.stop, emit)

        def on_piece(text: str) -> None:
            if job.cancelled:
                raise _Halt
            stop_filter.feed(text)

        streamer = CallbackStreamer(self.tokenizer, on_piece)
        try:
            gen = self._generate([job.prompt_ids], job.sampling, strip=False, streamer=streamer)[0]
            stop_filter.flush()
            reason = gen.finish_reason
        except _Halt:
            reason = "stop"
        text = "".join(pieces)
        return Generation(text, self.tokenizer(text, add_special_tokens=False)["input_ids"], reason)

    def score_ids(self, messages: list[Message], response: str) -> Encoded:
        """The tokens a scoring job runs for one response (the API checks their count first)."""
        conv = Conversation(messages=[*messages, Message("assistant", response)])
        return encode_conversation(conv, self.tokenizer, mask="last", system=self.system)[0]

    @torch.no_grad()
    def _score(self, job: Job) -> list[float] | None:
        """A reward head's value for each response, or (a plain LM) its mean token log-probability;
        None once the job is cancelled (checked between responses)."""
        messages, responses = job.score
        device = next(self.model.parameters()).device
        scores = []
        for response in responses:
            if job.cancelled:
                return None
            enc = self.score_ids(messages, response)
            ids = torch.tensor([enc.input_ids], device=device)  # (1, T)
            logits = self.model(input_ids=ids).logits  # (1, T, V) or (1, 1) for a reward head
            if logits.dim() == 2:  # a reward head: raw score minus the stored offset (rm.normalize_data)
                scores.append(float(logits[0, -1]) - reward_offset(self.model))
                continue
            token_logps = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]  # (T-1,)
            weights = torch.tensor(enc.weights[1:], device=device)
            scores.append(float((token_logps * weights).sum() / weights.sum().clamp(min=1)))
        return scores

    @property
    def score_kind(self) -> str:
        return "reward" if not hasattr(self.model, "lm_head") and hasattr(self.model, "score") else "mean_logprob"
