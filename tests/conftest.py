"""Shared fixtures: offline hub, the tiny random model (folder, tokenizer, loaded), a fake OpenAI-compatible server."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO.parent / "shared" / "assets"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny-random model folder (2 layers, hidden 64, ChatML tokenizer trained on our text)."""
    from posttrain.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(model, tokenizer) of the tiny model loaded for inference on CPU, once per test module."""
    from posttrain.models.run import load_model_for_inference

    model, tokenizer, _ = load_model_for_inference(str(tiny_dir), device="cpu")
    return model, tokenizer


def make_data(n=16, seed=0, vocab=300, learnable=False):
    """Random token rows of 6..19 tokens; `learnable` rows count upwards (next = current + 1)."""
    g = torch.Generator().manual_seed(seed)
    ids, weights = [], []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        if learnable:
            start = int(torch.randint(3, vocab - 20, (1,), generator=g))
            ids.append(list(range(start, start + length)))
        else:
            ids.append(torch.randint(3, vocab, (length,), generator=g).tolist())
        prompt = length // 3  # a "prompt" part without loss, then an answer part with loss
        weights.append([0.0] * prompt + [1.0] * (length - prompt))
    return ids, weights


class _FakeOpenAI(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: `answer(body, headers)` gives the reply's text, or an int HTTP status to fail with."""

    answer = None

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = self.answer(body, self.headers)
        if isinstance(text, int):
            self.send_response(text)
            self.end_headers()
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_openai():
    """Start a fake OpenAI-compatible server on 127.0.0.1: `fake_openai(answer)` returns its base URL (.../v1);
    every server started is shut down after the test."""
    servers = []

    def start(answer) -> str:
        handler = type("Handler", (_FakeOpenAI,), {"answer": staticmethod(answer)})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory) -> Path:
    """tiny-random-vision: a 2-layer DINOv2 (hidden 32) seeing a 32 px image as 16 patches."""
    from posttrain.models.tiny_vision import build_tiny_vision

    return build_tiny_vision(tmp_path_factory.mktemp("tiny-vision") / "model")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory, tiny_dir, tiny_vision_dir) -> Path:
    """tiny-random-vlm: tiny-random + tiny-random-vision + an MLP projector, one LLaVA folder with its processor."""
    from posttrain.models.tiny_vision import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "model", str(tiny_dir), str(tiny_vision_dir))


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20),
           "white": (245, 245, 245), "purple": (140, 40, 160)}


@pytest.fixture(scope="session")
def colour_pngs(tmp_path_factory) -> dict[str, Path]:
    """Solid-colour 40 px PNGs, name -> path (what the tiny VLM answers about each one depends on the machine's
    rounding: tests pick among them with `greedy_replies`)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(root / f"{name}.png")
    return {name: root / f"{name}.png" for name in COLOURS}


def greedy_replies(model, tokenizer, images: dict, question: str, max_new_tokens: int) -> dict:
    """name -> the greedy reply `posttrain chat --image` gives for each image (reference answers of vision tests)."""
    from posttrain.models.generate import generate_reply
    from posttrain.records import Message
    from posttrain.serve.chat import prompt_images

    replies = {}
    for name, path in images.items():
        content, pixels = prompt_images(model, [str(path)], question)
        replies[name] = generate_reply(model, tokenizer, [Message("user", content)], max_new_tokens=max_new_tokens,
                                       pixel_values=pixels)
    return replies
