"""A client that leaves before its reply is ready cancels its job: the engine skips it if it has not
started and stops a generate call between tokens once all its jobs are cancelled; other clients still
get their answers (tiny-random, a live in-process server)."""

import json
import socket
import threading
import time

import pytest
from test_api import LiveServer, expected, post

from posttrain.records import Message
from posttrain.serve.api import Models, create_app, load_engine
from posttrain.serve.engine import Job, Sampling
from posttrain.templates.render import encode_prompt


def wait_until(condition, what: str, limit_s: float = 60.0) -> None:
    """Poll until `condition()`; the limit only keeps a broken server from hanging the suite."""
    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def engine(tiny_dir):
    engine = load_engine(str(tiny_dir), name="tiny", device="cpu")
    yield engine
    engine.close()


def chat_body(prompt: str, max_tokens: int = 20) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()


def test_queued_job_of_a_disconnected_client_is_skipped(engine):
    submitted, calls = [], []  # jobs the API handed to the engine; prompts of every prefill (forward of > 1 token)
    real_submit = engine.submit
    started, release = threading.Event(), threading.Event()

    def submit(job):
        submitted.append(job)
        return real_submit(job)

    def on_forward(module, args, kwargs, output):
        if kwargs["input_ids"].shape[1] > 1:
            calls.append(kwargs["input_ids"].tolist())
        if len(calls) == 1:  # the first prefill holds the worker until both clients have queued behind it
            started.set()
            release.wait(60)

    engine.submit = submit
    handle = engine.model.register_forward_hook(on_forward, with_kwargs=True)
    live = LiveServer(create_app(Models({"tiny": engine})))
    try:
        hold = real_submit(Job(encode_prompt([Message("user", "hold")], engine.tokenizer), 1, Sampling(2)))
        assert started.wait(60)
        body = chat_body("Who are you?")  # client A: sends, then hangs up like a client that timed out
        sock = socket.create_connection(("127.0.0.1", live.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: len(submitted) == 1, "client A's job")
        sock.close()
        wait_until(lambda: submitted[0].cancelled, "the server to notice client A left")

        answer = {}  # client B: same settings as A, so without the skip they would share a batch
        client_b = threading.Thread(target=lambda: answer.update(
            reply=post(live.url + "/v1/chat/completions", chat_body("hi"))))
        client_b.start()
        wait_until(lambda: len(submitted) == 2, "client B's job")
        release.set()
        client_b.join(60)
        hold.result(60)
    finally:
        release.set()
        handle.remove()
        live.stop()
    status, reply = answer["reply"]
    assert status == 200 and reply["choices"][0]["message"]["content"] == expected(engine, "hi")
    prompt_b = encode_prompt([Message("user", "hi")], engine.tokenizer, system=engine.system)
    assert len(calls) == 2 and calls[1] == [prompt_b]  # A's prompt never reached the model
    assert submitted[0].future.cancelled() and engine.jobs_skipped == 1 and engine.batches_stopped == 0


def test_running_batch_stops_between_tokens_once_all_its_jobs_are_cancelled(engine):
    prompt = encode_prompt([Message("user", "Who are you?")], engine.tokenizer, system=engine.system)
    full = engine.submit(Job(prompt, 1, Sampling(max_new_tokens=40))).result(60)[0]
    assert len(full.token_ids) > 6  # without cancelling, it runs well past the third token

    job, steps = Job(prompt, 2, Sampling(max_new_tokens=40)), []

    def on_forward(*_):  # the client leaves while the third token is computed
        steps.append(1)
        if len(steps) == 3:
            job.cancelled = True

    handle = engine.model.register_forward_hook(on_forward)
    try:
        gens = engine.submit(job).result(60)
    finally:
        handle.remove()
    assert [g.token_ids for g in gens] == [full.token_ids[:3]] * 2
    assert engine.batches_stopped == 1 and engine.jobs_skipped == 0


def test_scoring_stops_between_responses_once_its_client_left(engine):
    submitted, forwards = [], []
    real_submit = engine.submit

    def submit(job):
        submitted.append(job)
        return real_submit(job)

    def on_forward(*_):  # the first response is being scored: hold the worker until the server saw the client go
        forwards.append(1)
        if len(forwards) == 1:
            wait_until(lambda: submitted[0].cancelled, "the server to notice the client left")

    engine.submit = submit
    live = LiveServer(create_app(Models({"tiny": engine})))
    handle = engine.model.register_forward_hook(on_forward)
    try:
        body = json.dumps({"model": "tiny", "prompt": "hi", "responses": [f"answer {i}" for i in range(6)]}).encode()
        sock = socket.create_connection(("127.0.0.1", live.port))
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: forwards, "scoring to start")
        sock.close()
        wait_until(lambda: submitted[0].future.done(), "the scoring job to end")
        handle.remove()
        status, reply = post(live.url + "/v1/score", json.dumps(
            {"model": "tiny", "prompt": "hi", "responses": ["a", "b"]}).encode())  # the worker still serves
    finally:
        handle.remove()
        live.stop()
    assert len(forwards) == 1 and submitted[0].future.cancelled()  # 5 of the 6 responses were never scored
    assert engine.batches_stopped == 1
    assert status == 200 and len(reply["data"]) == 2
