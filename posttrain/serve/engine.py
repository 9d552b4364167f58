"""The serving engine: one worker thread owns the model; requests queue up and run in batches.

HTTP handlers never touch the model. They submit a `Job` and wait on its Future, so 32 parallel
clients share forward passes of up to `max_batch` rows instead of 32 racing threads. Greedy, unseeded
sampled and streamed jobs join a running batch between decode steps (continuous batching,
serve/batcher.py). A seeded job runs alone so its seed means the same thing whatever else is queued;
image jobs and scoring jobs run alone too. Without the batcher (a model the lean loop cannot run),
jobs with equal sampling settings share a `generate` call and streamed jobs run one at a time.
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
from concurrent.futures import Future

import torch
from torch import nn

from posttrain.models.anatomy import context_length
from posttrain.models.decode import lean_decode_ok
from posttrain.models.generate import CallbackStreamer, Generation, generate_from_ids
from posttrain.models.load import reward_offset
from posttrain.models.onednn_linear import swap_in, swap_out
from posttrain.models.vision_load import image_inputs_of
from posttrain.records import Conversation, Message
from posttrain.serve.batcher import Batcher
from posttrain.serve.jobs import Job, Sampling, StopFilter, _Halt  # noqa: F401 - importable from here too
from posttrain.templates.render import Encoded, encode_conversation

log = logging.getLogger(__name__)
_RNG_LOCK = threading.Lock()  # held by every sampling (temperature > 0) generate call, across engines


class EngineClosed(RuntimeError):
    """The server is shutting down and takes no new work."""


class Engine:
    """Owns `model` on a worker thread; `submit` is safe from any thread."""

    def __init__(self, model: nn.Module, tokenizer, name: str, *, system: str | None = None,
                 max_batch: int = 32, batch_wait_s: float = 0.01, continuous: bool = True):
        self.model, self.tokenizer, self.name, self.system = model, tokenizer, name, system
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.context_length = context_length(model)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.closing = False
        self._batches_run = 0  # generate calls made (+ the batcher's prefills); tests read it to see batching
        self._jobs_skipped = 0  # cancelled before they started: never run
        self._batches_stopped = 0  # generate calls, scoring jobs or batcher jobs ended early: their client left
        # continuous: jobs join a running batch between decode steps (a model the lean loop can run)
        self.batcher = Batcher(model, tokenizer, max_batch) if continuous and lean_decode_ok(model) else None
        # the engine's weights never change: their oneDNN copies made once, kept; greedy batches' head in bfloat16
        self.onednn = swap_in(model, head="both")
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
        if not self.thread.is_alive():
            swap_out(self.onednn)

    # ------------------------------------------------------------------ worker thread

    def _loop(self) -> None:
        done = False
        while not done:
            # With rows running, take only what is already queued: the next decode step must not wait.
            jobs, done = self._gather(block=not self.batcher)
            self._run(jobs)
            if self.batcher:
                self._step()
        while self.batcher:  # shutting down: finish the running rows
            self._step()

    def _gather(self, block: bool) -> tuple[list[Job], bool]:
        """(jobs, whether the shutdown marker came). Blocking: wait for one, then gather what arrives within a
        few ms (concurrent clients land in the same batch)."""
        jobs: list[Job] = []
        deadline = None
        while len(jobs) < self.max_batch:
            try:
                if not block:
                    job = self.queue.get_nowait()
                elif deadline is None:
                    job = self.queue.get()
                    deadline = time.monotonic() + self.batch_wait_s
                else:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _step(self) -> None:
        try:
            self.batcher.step()
        except Exception as err:  # noqa: BLE001 - any model error belongs to the running requests only
            log.exception("generation failed")
            self.batcher.fail(err)

    @property
    def batches_run(self) -> int:
        return self._batches_run + (self.batcher.prefills if self.batcher is not None else 0)

    @property
    def jobs_skipped(self) -> int:
        return self._jobs_skipped + (self.batcher.jobs_skipped if self.batcher is not None else 0)

    @property
    def batches_stopped(self) -> int:
        return self._batches_stopped + (self.batcher.jobs_stopped if self.batcher is not None else 0)

    def _run(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            if self.batcher is not None and self.batcher.takes(job):
                self.batcher.add(job)
            elif job.score is not None or job.on_text is not None or job.sampling.seed is not None or job.images:
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
            self._jobs_skipped += 1
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
                  jobs: list[Job] = (), images: list = ()) -> list[Generation]:
        """generate_from_ids; with `jobs`, it stops between tokens once all of them are cancelled.
        `images`: one prompt's images; every row (all copies of that prompt) gets them."""
        self._batches_run += 1
        pixel_values = None
        if images:  # (rows * k, 3, H, W): the k images of each row, row after row
            pixel_values = image_inputs_of(self.model).pixel_values(list(images) * len(prompts))
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
                pixel_values=pixel_values,
            )
        self._batches_stopped += len(stopped)
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
                self._batches_stopped += 1
            else:
                job.future.set_result(scores)
        elif job.on_text is None:
            job.future.set_result(self._generate([job.prompt_ids] * job.n, job.sampling, job.strip, jobs=jobs,
                                                 images=job.images))
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
            gen = self._generate([job.prompt_ids], job.sampling, strip=False, streamer=streamer, images=job.images)[0]
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
