"""The OpenAI-compatible server, live on 127.0.0.1 with the tiny model, driven by the official client."""

import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from posttrain.records import Message  # noqa: E402
from posttrain.serve.api import Limits, Models, create_app, load_engine  # noqa: E402
from posttrain.models.generate import generate_reply  # noqa: E402
from posttrain.serve.engine import Job, Sampling, StopFilter, _Halt  # noqa: E402
from posttrain.models.decode import RaggedBatch  # noqa: E402
from posttrain.models.generate import generate_batch, generate_from_ids  # noqa: E402

KEY = "sk-test-key"
PROMPTS = ["hi", "Who are you?", "What is the capital of France?", "你好", "def run(cfg)", "Hello! tell me more"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a thread; `stop()` is the same graceful path as Ctrl-C."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
            assert self.thread.is_alive(), "server failed to start"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(tiny_dir):
    engine = load_engine(str(tiny_dir), name="tiny", device="cpu")
    live = LiveServer(create_app(Models({"tiny": engine}), api_key=KEY, limits=Limits(max_tokens=64,
                                                                                       max_body_bytes=20_000)))
    yield live, engine
    live.stop()
    assert not engine.thread.is_alive()  # lifespan shutdown closed the engine


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0)


def expected(engine, prompt: str, max_tokens: int = 20) -> str:
    return generate_reply(engine.model, engine.tokenizer, [Message("user", prompt)], max_new_tokens=max_tokens)


def post(url: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {key}",
                                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_and_chat_match_posttrain_chat(served, client):
    _, engine = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for prompt in PROMPTS[:3]:
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                             temperature=0, max_tokens=20)
        assert out.choices[0].message.content == expected(engine, prompt)
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.usage.completion_tokens <= 20 and out.usage.prompt_tokens > 0


def test_streaming_matches_non_streaming(served, client):
    _, engine = served
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Who are you?"}],
                                            temperature=0, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert text.strip() == expected(engine, "Who are you?")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0


def test_sampling_n_seed_and_stop(served, client):
    _, engine = served
    args = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=1.0, top_p=0.9)
    first = client.chat.completions.create(n=3, seed=7, **args)
    again = client.chat.completions.create(n=3, seed=7, **args)
    texts = [c.message.content for c in first.choices]
    assert len(texts) == 3 and texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # three samples from a random model differ
    greedy = expected(engine, "hi")
    stop = greedy[4:7]
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                         max_tokens=20, stop=[stop])
    assert out.choices[0].message.content == greedy[: greedy.find(stop)].strip()
    assert out.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              temperature=0, max_tokens=20, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == \
        greedy[: greedy.find(stop)].strip()


def test_completions_are_raw_text(served, client):
    _, engine = served
    out = client.completions.create(model="tiny", prompt="The capital of France", max_tokens=10, temperature=0)
    ids = engine.tokenizer("The capital of France", add_special_tokens=False)["input_ids"]
    want = generate_from_ids(engine.model, engine.tokenizer, [ids], max_new_tokens=10, strip=False)[0]
    assert out.choices[0].text == want.text and out.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(model="tiny", prompt="The capital of France", max_tokens=10,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text


def test_score_endpoint(served):
    live, _ = served
    body = json.dumps({"model": "tiny", "prompt": "hi", "responses": ["Hello!", "zzzz qqq"]}).encode()
    status, out = post(live.url + "/v1/score", body)
    assert status == 200 and out["score_type"] == "mean_logprob"
    scores = [d["score"] for d in out["data"]]
    assert len(scores) == 2 and all(math.isfinite(s) and s < 0 for s in scores) and scores[0] != scores[1]


def test_bad_requests_get_openai_errors(served, client):
    live, _ = served
    msgs = [{"role": "user", "content": "hi"}]
    bad_key = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=msgs)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=msgs, temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=65)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    status, body = post(live.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(live.url + "/v1/chat/completions", json.dumps({"model": "tiny", "messages": [
        {"role": "user", "content": "x" * 30_000}]}).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_32_parallel_clients_are_batched_and_correct(served, client):
    _, engine = served
    want = {p: expected(engine, p, 16) for p in PROMPTS}
    before = engine.batches_run
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(32)]

    def ask(prompt):
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                             temperature=0, max_tokens=16)
        return out.choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [want[p] for p in jobs]
    assert engine.batches_run - before < 32  # requests shared generate calls


def test_generate_batch_equals_single_replies(served):
    _, engine = served
    convs = [[Message("user", p)] for p in PROMPTS]
    assert generate_batch(engine.model, engine.tokenizer, convs, max_new_tokens=16) == \
        [expected(engine, p, 16) for p in PROMPTS]


def test_engine_close_finishes_queued_jobs(tiny_dir):
    engine = load_engine(str(tiny_dir), name="t2", device="cpu")
    ids = engine.tokenizer("hello", add_special_tokens=False)["input_ids"]
    futures = [engine.submit(Job(ids, 1, Sampling(max_new_tokens=4))) for _ in range(5)]
    engine.close()
    assert all(f.done() and len(f.result()) == 1 for f in futures)


def test_stop_filter_holds_back_partial_stops():
    out = []
    f = StopFilter(("END",), out.append)
    f.feed("abc E")
    assert out == ["abc "]
    f.feed("x")
    assert out == ["abc ", "Ex"]
    with pytest.raises(_Halt):
        f.feed("yEN" + "D tail")
    assert "".join(out) == "abc Exy" and f.hit


def post_raw(url: str, text: str) -> tuple[int, dict]:
    """POST a JSON text as given (it may hold NaN, huge numbers or \\ud800 escapes)."""
    return post(url, text.encode())


CHAT = '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, '
BAD_BODIES = [
    ("/v1/chat/completions", CHAT + '"seed": 1180591620717411303424}', "seed"),  # 2**70
    ("/v1/chat/completions", CHAT + '"seed": -1180591620717411303424}', "seed"),
    ("/v1/chat/completions", CHAT + '"seed": 1.5}', "seed"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages"),
    ("/v1/chat/completions", '{"model": "tiny\\udfff", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/chat/completions", CHAT + '"stop": ["\\ud800"]}', "stop"),
    ("/v1/chat/completions", CHAT + '"n": 1180591620717411303424}', "n"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                             '"max_tokens": 1180591620717411303424}', "max_tokens"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e300}',
     "max_tokens"),
    ("/v1/chat/completions", CHAT + '"temperature": 1180591620717411303424}', "temperature"),
    ("/v1/chat/completions", CHAT + '"temperature": NaN}', None),
    ("/v1/chat/completions", CHAT + '"top_p": Infinity}', None),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": 5}]}]}', "messages"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": [5]}]}', "messages"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": "hi"}', "messages"),
    ("/v1/chat/completions", CHAT + '"stream_options": "yes"}', "stream_options"),
    ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800", "max_tokens": 4}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "max_tokens": 4, "seed": 1180591620717411303424}', "seed"),
    ("/v1/completions", '{"model": "tiny", "prompt": [], "max_tokens": 4}', "prompt"),
    ("/v1/score", '{"model": "tiny", "prompt": "hi", "responses": ["\\udc00"]}', "responses"),
    ("/v1/score", '{"model": "tiny", "prompt": "hi", "responses": [5]}', "responses"),
    ("/v1/score", '{"model": "tiny", "messages": [{"role": "user", "content": "x\\ud800"}], "responses": ["a"]}',
     "messages"),
]


@pytest.mark.parametrize(("path", "text", "param"), BAD_BODIES)
def test_out_of_range_or_malformed_values_are_400_with_an_openai_body(served, path, text, param):
    live, _ = served
    status, body = post_raw(live.url + path, text)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    if param is not None:
        assert (body["error"]["param"] or "").split(".")[0] == param


def test_seeds_in_torch_range_still_work(served, client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         temperature=1.0, seed=2**63 - 1)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_score_checks_the_context_length(served):
    live, engine = served
    long = "hello " * 2500  # over the tiny model's 2048 positions
    for body in ({"model": "tiny", "prompt": "hi", "responses": ["fine", long]},
                 {"model": "tiny", "messages": [{"role": "user", "content": long}], "responses": ["a"]}):
        before = engine.batches_run
        status, out = post(live.url + "/v1/score", json.dumps(body).encode())
        assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
        assert "2048" in out["error"]["message"] and engine.batches_run == before


def test_internal_errors_do_not_leak_their_text(served, client, monkeypatch):
    live, engine = served

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /home/someone/key.txt")

    monkeypatch.setattr(engine, "_generate", broken)
    monkeypatch.setattr(RaggedBatch, "add", broken)  # the running batch's prefill (continuous batching)
    status, body = post(live.url + "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode())
    assert status == 500 and body["error"]["type"] == "server_error" and "secret" not in json.dumps(body)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                            stream=True)
    with pytest.raises(openai.APIError) as err:
        list(stream)
    assert "secret" not in str(err.value) and "secret" not in json.dumps(err.value.body or {})
