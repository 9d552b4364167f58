"""Images in chat and serving, on the tiny LLaVA: `posttrain chat --image` and a greedy OpenAI image_url request
(streamed or not) answer exactly what generate_reply answers with the same image, and the answer depends on the
image; refusals are 400s / one-line errors.

A request without `temperature` samples (OpenAI's default is 1.0) while chat is greedy: the two agree only at
temperature 0. (An earlier version of this test omitted it and compared a sample with the greedy reply.)"""

import base64
import json

import pytest
from conftest import greedy_replies
from inprocess import call

from posttrain.cli import main
from posttrain.records import Message
from posttrain.serve.api import Models, create_app, load_engine
from posttrain.templates.render import encode_prompt

KEY = "sk-test"
QUESTION = "What colour is this?"
TOKENS = 6
SERVED = ("red", "blue", "green", "yellow")


@pytest.fixture(scope="module")
def engine(tiny_vlm_dir):
    engine = load_engine(str(tiny_vlm_dir), name="m", device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def expected(engine, colour_pngs) -> dict:
    """colour -> generate_reply's greedy answer for its image (what chat gives)."""
    return greedy_replies(engine.model, engine.tokenizer, {c: colour_pngs[c] for c in SERVED}, QUESTION, TOKENS)


def _chat(app, content, **extra) -> tuple[int, dict]:
    body = json.dumps({"model": "m", "max_tokens": TOKENS, "temperature": 0, "messages": [
        {"role": "user", "content": content}], **extra}).encode()
    reply = call(app, "POST", "/v1/chat/completions", body=body,
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    return reply.status, reply.json() if not extra.get("stream") else reply.body.decode()


def _parts(image) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]


def _streamed_text(sse: str) -> str:
    chunks = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_server_answers_an_image_url_request_as_chat_does(engine, expected, colour_pngs, tiny_dir):
    app = create_app(Models({"m": engine}), api_key=KEY)
    prompt = encode_prompt([Message("user", "<image>" + QUESTION)], engine.tokenizer)
    assert prompt.count(engine.tokenizer.convert_tokens_to_ids("<image>")) == 16
    for colour in SERVED:
        status, body = _chat(app, _parts(colour_pngs[colour]))
        assert status == 200 and body["usage"]["prompt_tokens"] == len(prompt)
        assert body["choices"][0]["message"]["content"] == expected[colour]
        status, sse = _chat(app, _parts(colour_pngs[colour]), stream=True)
        assert status == 200 and _streamed_text(sse).strip() == expected[colour]
    assert len(set(expected.values())) > 1  # the answer comes from the image, in both paths

    parts = _parts(colour_pngs["red"])
    status, body = _chat(app, [{"type": "image_url", "image_url": {"url": str(colour_pngs["red"])}}])
    assert status == 400 and "data:image" in body["error"]["message"]  # a request never reads server files
    text_engine = load_engine(str(tiny_dir), name="m", device="cpu")
    status, body = _chat(create_app(Models({"m": text_engine}), api_key=KEY), parts)
    text_engine.close()
    assert status == 400 and "takes no images" in body["error"]["message"]


def test_chat_prompt_with_image(expected, colour_pngs, tiny_vlm_dir, tiny_dir, capsys):
    colour = max(expected, key=lambda c: len(expected[c]))  # an image the tiny model says something about
    assert expected[colour]
    assert main(["chat", str(tiny_vlm_dir), "--prompt", QUESTION, "--image", str(colour_pngs[colour]),
                 "--max-new-tokens", str(TOKENS)]) == 0
    assert capsys.readouterr().out.strip() == expected[colour]
    assert main(["chat", str(tiny_dir), "--prompt", QUESTION, "--image", str(colour_pngs[colour])]) == 2
    assert "takes no images" in capsys.readouterr().err
