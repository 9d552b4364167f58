"""Images in chat and serving, on the tiny LLaVA: `posttrain chat --image` and a greedy OpenAI image_url request
(streamed or not) answer exactly what generate_reply answers with the same image, and the answer depends on the
image; refusals are 400s / one-line errors.

A request without `temperature` samples (OpenAI's default is 1.0) while chat is greedy: the two agree only at
temperature 0. (An earlier version of this test omitted it and compared a sample with the greedy reply.)"""

import base64
import json

import pytest
from inprocess import call

from posttrain.cli import main
from posttrain.models.generate import generate_reply
from posttrain.records import Message
from posttrain.serve.api import Models, create_app, load_engine
from posttrain.serve.chat import prompt_images
from posttrain.templates.render import encode_prompt

KEY = "sk-test"
QUESTION = "What colour is this?"


def _png(folder, name, rgb):
    from PIL import Image

    path = folder / f"{name}.png"
    Image.new("RGB", (40, 40), rgb).save(path)
    return path


@pytest.fixture(scope="module")
def red_png(tmp_path_factory):
    return _png(tmp_path_factory.mktemp("img"), "red", (220, 30, 30))


@pytest.fixture(scope="module")
def blue_png(tmp_path_factory):  # the random tiny VLM answers this one with several tokens (red: an empty reply)
    return _png(tmp_path_factory.mktemp("img"), "blue", (30, 30, 220))


@pytest.fixture(scope="module")
def engine(tiny_vlm_dir):
    engine = load_engine(str(tiny_vlm_dir), name="m", device="cpu")
    yield engine
    engine.close()


def _expected(engine, image) -> str:
    content, pixels = prompt_images(engine.model, [str(image)], QUESTION)
    return generate_reply(engine.model, engine.tokenizer, [Message("user", content)], max_new_tokens=6,
                          pixel_values=pixels)


def _chat(app, content, **extra) -> tuple[int, dict]:
    body = json.dumps({"model": "m", "max_tokens": 6, "temperature": 0, "messages": [
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


def test_server_answers_an_image_url_request_as_chat_does(engine, red_png, blue_png, tiny_dir):
    app = create_app(Models({"m": engine}), api_key=KEY)
    replies = {}
    for image in (red_png, blue_png):
        status, body = _chat(app, _parts(image))
        expected = _expected(engine, image)
        prompt = encode_prompt([Message("user", "<image>" + QUESTION)], engine.tokenizer)
        assert prompt.count(engine.tokenizer.convert_tokens_to_ids("<image>")) == 16
        assert status == 200 and body["usage"]["prompt_tokens"] == len(prompt)
        assert body["choices"][0]["message"]["content"] == expected
        status, sse = _chat(app, _parts(image), stream=True)
        assert status == 200 and _streamed_text(sse).strip() == expected
        replies[image.name] = expected
    assert replies["red.png"] != replies["blue.png"]  # the answer comes from the image, in both paths

    parts = _parts(red_png)
    status, body = _chat(app, [{"type": "image_url", "image_url": {"url": str(red_png)}}])
    assert status == 400 and "data:image" in body["error"]["message"]  # a request never reads server files
    text_engine = load_engine(str(tiny_dir), name="m", device="cpu")
    status, body = _chat(create_app(Models({"m": text_engine}), api_key=KEY), parts)
    text_engine.close()
    assert status == 400 and "takes no images" in body["error"]["message"]


def test_chat_prompt_with_image(engine, tiny_vlm_dir, tiny_dir, red_png, blue_png, capsys):
    assert main(["chat", str(tiny_vlm_dir), "--prompt", QUESTION, "--image", str(blue_png),
                 "--max-new-tokens", "6"]) == 0
    expected = _expected(engine, blue_png).strip()
    assert expected and capsys.readouterr().out.strip() == expected
    assert main(["chat", str(tiny_dir), "--prompt", QUESTION, "--image", str(red_png)]) == 2
    assert "takes no images" in capsys.readouterr().err
