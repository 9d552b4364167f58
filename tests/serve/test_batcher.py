"""Continuous batching (serve/batcher.py): greedy requests that join a running batch between decode steps
get exactly the answer they get alone, and a short late request is answered before a long one ends."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.models.generate import generate_from_ids
from posttrain.records import Message
from posttrain.serve.engine import Engine, Job, Sampling
from posttrain.templates.render import encode_prompt


def sharp_model(tiny):
    """The tiny model with 4x query/key weights: attention peaky enough that a mis-merged cache row or a
    wrong position changes greedy tokens."""
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(4.0)
    return model


def test_requests_joining_a_running_batch_get_their_answers_alone(tiny):
    model, tokenizer = sharp_model(tiny), tiny[1]
    texts = ["Write a poem", "hi", "What is two plus two?", "Name a colour", "ok then"]
    prompts = [encode_prompt([Message("user", t)], tokenizer) for t in texts]
    settings = [Sampling(40), Sampling(6), Sampling(12, stop=("e",)), Sampling(9), Sampling(5)]
    alone = [generate_from_ids(model, tokenizer, [p], max_new_tokens=s.max_new_tokens, stop=list(s.stop))[0]
             for p, s in zip(prompts, settings)]
    engine = Engine(model, tokenizer, "sharp", max_batch=8)
    finished, rows_per_step, late = [], [], []

    def on_forward(module, args, kwargs, output):
        rows_per_step.append(kwargs["input_ids"].shape[0])
        if len(rows_per_step) == 4:  # the long request is decoding: four more arrive, two with 2 choices
            for i in range(1, 5):
                job = Job(prompts[i], 2 if i % 2 else 1, settings[i])
                job.future.add_done_callback(lambda _, i=i: finished.append(i))
                late.append(job)
                engine.submit(job)

    handle = model.register_forward_hook(on_forward, with_kwargs=True)
    try:
        first = Job(prompts[0], 1, settings[0])
        first.future.add_done_callback(lambda _: finished.append(0))
        got = [engine.submit(first).result(60)] + [job.future.result(60) for job in [*late]]
    finally:
        handle.remove()
        engine.close()
    for want, gens in zip(alone, got):
        assert all(g == want for g in gens)
    assert [len(g) for g in got] == [1, 2, 1, 2, 1]
    assert max(rows_per_step) > 2  # the late rows shared decode steps with the running one
    assert finished[-1] == 0 and alone[0].finish_reason == "length"  # short requests did not wait for it


def run_with_late_jobs(model, engine, first: Job, late: list[Job]) -> list[int]:
    """Submit `first`; once it is decoding, submit `late`; wait for all. Returns the rows of every forward."""
    rows_per_step = []

    def on_forward(module, args, kwargs, output):
        rows_per_step.append(kwargs["input_ids"].shape[0])
        if len(rows_per_step) == 3:
            for job in late:
                engine.submit(job)

    handle = model.register_forward_hook(on_forward, with_kwargs=True)
    try:
        engine.submit(first).result(60)
        for job in late:
            job.future.result(60)
    finally:
        handle.remove()
        engine.close()
    return rows_per_step


def test_streamed_requests_join_and_send_what_they_get_alone(tiny):
    model, tokenizer = sharp_model(tiny), tiny[1]
    prompts = [encode_prompt([Message("user", t)], tokenizer) for t in ["Write a poem", "hi", "Name a colour"]]
    settings = [Sampling(30), Sampling(10), Sampling(12, stop=("e",))]
    alone = [generate_from_ids(model, tokenizer, [p], max_new_tokens=s.max_new_tokens, stop=list(s.stop),
                               strip=False)[0] for p, s in zip(prompts, settings)]
    sent: dict[tuple[int, int], list[str]] = {}
    late = [Job(prompts[i], 2, settings[i], strip=False,
                on_text=lambda index, piece, i=i: sent.setdefault((i, index), []).append(piece)) for i in (1, 2)]
    engine = Engine(model, tokenizer, "sharp", max_batch=8)
    rows_per_step = run_with_late_jobs(model, engine, Job(prompts[0], 1, settings[0]), late)
    assert max(rows_per_step) == 5  # both streamed jobs (2 choices each) decoded beside the running row
    for i, job in zip((1, 2), late):
        gens = job.future.result()
        for index, gen in enumerate(gens):
            assert "".join(sent[i, index]) == gen.text == alone[i].text  # streamed, returned and alone agree
            assert gen.finish_reason == alone[i].finish_reason
    assert "e" not in alone[2].text and alone[2].finish_reason == "stop"  # the stop string was held back


def test_unseeded_sampled_requests_join_with_their_own_random_stream(tiny):
    model, tokenizer = sharp_model(tiny), tiny[1]
    prompts = [encode_prompt([Message("user", t)], tokenizer) for t in ["Write a poem", "hi", "What is two plus two?"]]
    greedy = [generate_from_ids(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts[1:]]
    # sampled, but so sharp that every draw is the argmax: the closest top-two logits on these prompts are 6.6e-4
    # apart, which at 1e-4 left a 0.14% chance of the second token (a CI run drew it); at 1e-6, exp(-660)
    cold = Sampling(12, temperature=1e-6)
    hot = Sampling(12, temperature=1.0)
    late = [Job(prompts[1], 2, cold), Job(prompts[2], 1, cold), Job(prompts[2], 3, hot)]
    engine = Engine(model, tokenizer, "sharp", max_batch=8)
    rng = torch.get_rng_state()
    rows_per_step = run_with_late_jobs(model, engine, Job(prompts[0], 1, Sampling(30)), late)
    assert torch.equal(torch.get_rng_state(), rng)  # each job drew from its own generator, not torch's stream
    assert max(rows_per_step) == 7 and engine.batches_run == 2  # one prefill for the first, one for the late
    assert [g.text for g in late[0].future.result()] == [greedy[0].text] * 2  # each row got its own logits
    assert [g.text for g in late[1].future.result()] == [greedy[1].text]
    hot_texts = [g.text for g in late[2].future.result()]
    assert len(hot_texts) == 3 and len(set(hot_texts)) > 1  # three independent samples


def test_a_failed_prefill_answers_its_jobs_with_the_error(tiny, monkeypatch):
    from posttrain.models.decode import RaggedBatch

    def broken(*args, **kwargs):
        raise RuntimeError("prefill failed")

    monkeypatch.setattr(RaggedBatch, "add", broken)
    engine = Engine(tiny[0], tiny[1], "tiny", max_batch=8)
    prompt = encode_prompt([Message("user", "hi")], tiny[1])
    try:
        futures = [engine.submit(Job(prompt, 1, s)) for s in (Sampling(4), Sampling(4, temperature=1.0))]
        for future in futures:  # not left waiting forever
            assert str(future.exception(30)) == "prefill failed"
    finally:
        monkeypatch.undo()
        engine.close()


def test_a_queue_is_admitted_once_several_rows_are_free_and_a_short_one_at_once(tiny, monkeypatch):
    from posttrain.models.decode import RaggedBatch
    from posttrain.serve.batcher import Batcher

    model, tokenizer = sharp_model(tiny), tiny[1]
    texts = ["a", "bb", "ccc dd", "e", "ff gg hh", "i", "jj", "k"]
    prompts = [encode_prompt([Message("user", t)], tokenizer) for t in texts]
    settings = [Sampling(n) for n in (3, 5, 7, 9, 4, 6, 8, 2)]  # rows end at different steps
    alone = [generate_from_ids(model, tokenizer, [p], max_new_tokens=s.max_new_tokens)[0]
             for p, s in zip(prompts, settings)]
    admitted, real_add = [], RaggedBatch.add
    monkeypatch.setattr(RaggedBatch, "add", lambda self, ps: admitted.append(len(ps)) or real_add(self, ps))
    batcher = Batcher(model, tokenizer, max_rows=4)
    batcher.admit_rows = 2
    jobs = [Job(p, 1, s) for p, s in zip(prompts, settings)]
    for job in jobs:
        batcher.add(job)
    while batcher:
        batcher.step()
    assert [job.future.result()[0] for job in jobs] == alone
    assert admitted[0] == 4 and all(n >= 2 for n in admitted[1:]) and sum(admitted) == 8  # rows ended one by one

    admitted.clear()  # no queue: a job that fits is admitted at the next step, even below admit_rows
    for job in (jobs := [Job(p, 1, Sampling(20)) for p in prompts[:3]]):
        batcher.add(job)
    batcher.step()
    batcher.add(late := Job(prompts[3], 1, Sampling(2)))
    batcher.step()
    assert admitted == [3, 1] and len(batcher.rows) == 4
    while batcher:
        batcher.step()
    assert late.future.result()[0] == generate_from_ids(model, tokenizer, [prompts[3]], max_new_tokens=2)[0]


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bfloat16 products on this CPU")
def test_greedy_batches_take_their_tokens_from_the_greedy_head_and_sampled_rows_see_logits(tiny, monkeypatch):
    from posttrain.models import greedy_head, onednn_linear
    from posttrain.models.decode import RaggedBatch

    monkeypatch.setattr(onednn_linear, "MIN_BYTES", 0)  # the tiny model through oneDNN and the hand-written step,
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 0)  # with a bfloat16 head copy on any CPU
    monkeypatch.setattr(greedy_head, "cpu_has_fast_bf16", lambda: True)
    steps = {"greedy": 0, "logits": 0, "head": 0}
    real_greedy, real_step, real_head = RaggedBatch.step_greedy, RaggedBatch.step, greedy_head.GreedyHead.argmax

    def counted(kind, fn):
        return lambda *a: steps.__setitem__(kind, steps[kind] + 1) or fn(*a)
    monkeypatch.setattr(RaggedBatch, "step_greedy", counted("greedy", real_greedy))
    monkeypatch.setattr(RaggedBatch, "step", counted("logits", real_step))
    monkeypatch.setattr(greedy_head.GreedyHead, "argmax", counted("head", real_head))
    model, tokenizer = sharp_model(tiny), tiny[1]
    prompts = [encode_prompt([Message("user", t)], tokenizer) for t in ["Write a poem", "hi", "Name a colour"]]
    alone = [generate_from_ids(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert steps["head"] > 0 and steps["logits"] == 0
    steps.update(greedy=0, logits=0, head=0)
    engine = Engine(model, tokenizer, "sharp", max_batch=8)
    try:
        got = [f.result(60) for f in [engine.submit(Job(p, 1, Sampling(12))) for p in prompts]]
        greedy_steps = dict(steps)
        sampled = engine.submit(Job(prompts[0], 2, Sampling(12, temperature=1.0))).result(60)
    finally:
        engine.close()
    assert [g[0] for g in got] == alone
    assert greedy_steps["greedy"] > 0 and greedy_steps["head"] == greedy_steps["greedy"] and greedy_steps["logits"] == 0
    assert steps["logits"] > 0 and steps["greedy"] == greedy_steps["greedy"] and len(sampled) == 2
