"""Continuous batching (serve/batcher.py): greedy requests that join a running batch between decode steps
get exactly the answer they get alone, and a short late request is answered before a long one ends."""

from __future__ import annotations

import copy

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
