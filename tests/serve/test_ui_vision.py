"""The UI chat with an image, in real headless Chromium: upload a picture in the Chat tab, ask, and get the
answer `generate_reply` gives for that image (the tiny LLaVA, greedy); the turn shows the picture, the chat log
holds its placeholder; a photo too large for a request is redrawn smaller in the page and still answered; a
text-only model answers with an error in the log. Skips only without chromium."""

import json

import pytest

from test_ui import CHROMEDRIVER, CHROMIUM, FLAGS, el, fill, screenshot, wait_text

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium/chromedriver: run "
                                "scripts/install_browser.sh")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from conftest import greedy_replies  # noqa: E402
from posttrain.models.generate import generate_reply  # noqa: E402
from posttrain.models.run import load_model_for_inference  # noqa: E402
from posttrain.records import Message  # noqa: E402
from posttrain.serve.chat import prompt_images  # noqa: E402
from posttrain.serve.chatlog import ChatLog  # noqa: E402
from posttrain.serve.ui.app import create_ui_app  # noqa: E402
from test_api import LiveServer  # noqa: E402

TOKEN = "vision-ui-test-token-0123456789"
QUESTION = "What colour is this?"


@pytest.fixture(scope="module")
def vision_ui(tiny_vlm_dir, tiny_dir, colour_pngs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ui")
    model, tokenizer, _ = load_model_for_inference(str(tiny_vlm_dir), device="cpu")
    picks = {c: colour_pngs[c] for c in ("red", "blue", "green", "yellow")}
    replies = greedy_replies(model, tokenizer, picks, QUESTION, 8)  # a prefix of the 128-token reply
    image = picks[max(replies, key=lambda c: len(replies[c]))]  # one the random tiny VLM says something about
    live = LiveServer(create_ui_app(workdir, [str(tiny_vlm_dir), str(tiny_dir)], annotator="alice", device="cpu",
                                    token=TOKEN, chat_log=ChatLog(workdir / "logs")))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.get(f"{live.url}/?token={TOKEN}")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    yield driver, live, workdir, image
    driver.quit()
    live.stop()


def _ask_with_image(driver, image, model, kind="png"):
    fill(driver, "model-a", model)
    el(driver, "clear").click()
    el(driver, "chat-image").send_keys(str(image))
    wait_text(driver, "chat-status", lambda t: t == f"image ready: {image.name}", timeout=30)
    assert el(driver, "chat-image-preview").get_attribute("src").startswith(f"data:image/{kind};base64,")
    fill(driver, "chat-input", QUESTION)
    el(driver, "send").click()
    wait_text(driver, "chat-status", lambda t: t in ("done",) or t.startswith("error"))
    return el(driver, "log-a").get_attribute("textContent")


def test_chat_answers_an_uploaded_image(vision_ui, tiny_vlm_dir, tiny_dir):
    driver, live, workdir, image = vision_ui
    log = _ask_with_image(driver, image, str(tiny_vlm_dir))
    engine = live.server.config.app.state.models.engines[str(tiny_vlm_dir)]
    content, pixels = prompt_images(engine.model, [str(image)], QUESTION)
    want = generate_reply(engine.model, engine.tokenizer, [Message("user", content)], max_new_tokens=128,
                          pixel_values=pixels)
    assert want and log == f"you: {QUESTION}assistant: {want}"
    assert driver.find_elements(By.CSS_SELECTOR, "#log-a img.turn-image")  # the turn shows its picture
    assert el(driver, "chat-image-preview").get_attribute("style").count("none")  # used up by the message
    screenshot(driver, "ui-chat-image.png")
    (logged,) = [json.loads(x) for x in (workdir / "logs" / "chat.jsonl").read_text().splitlines()]
    assert logged["messages"][-1] == {"role": "user", "content": "<image>" + QUESTION}

    log = _ask_with_image(driver, image, str(tiny_dir))  # a text-only model refuses the image, in the log
    assert "[error] model" in log and "takes no images" in log


def test_a_large_photo_is_redrawn_to_fit_a_request(vision_ui, tiny_vlm_dir, tmp_path):
    import numpy as np
    from PIL import Image

    driver, _, _, _ = vision_ui
    noise = tmp_path / "noise.png"  # ~3 MB as PNG: over the server's 1 MiB request limit as a data URL
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(noise)
    assert noise.stat().st_size > 2_000_000
    log = _ask_with_image(driver, noise, str(tiny_vlm_dir), kind="jpeg")
    assert el(driver, "chat-status").text == "done" and log.startswith(f"you: {QUESTION}assistant: ")
    assert "[error]" not in log
