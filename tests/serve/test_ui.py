"""The web UI in real headless Chromium: chat + arena vote, rank and export, a tiny training run. The page
is opened with its token (?token=...), as a person opens the URL `posttrain ui` prints; data files sit in
a --data-dir folder.

Needs Debian `chromium` + `chromium-driver` (scripts/install_browser.sh); skips only when they are
missing. POSTTRAIN_SCREENSHOTS=docs saves a PNG of each tab (the README's pictures).
"""

import json
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium/chromedriver: run "
                                "scripts/install_browser.sh")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from posttrain.records import Message  # noqa: E402
from posttrain.models.tiny import build_tiny  # noqa: E402
from posttrain.models.generate import generate_reply  # noqa: E402
from posttrain.cli import ui_run_configs  # noqa: E402
from posttrain.serve.chatlog import ChatLog  # noqa: E402
from posttrain.serve.ui.app import create_ui_app  # noqa: E402
from test_api import LiveServer  # noqa: E402

TOKEN = "browser-test-token-0123456789"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1150"]


@pytest.fixture(scope="module")
def ui(tiny_dir, tmp_path_factory):
    other = build_tiny(tmp_path_factory.mktemp("tiny-b") / "model-b", seed=1)
    workdir, data = tmp_path_factory.mktemp("ui"), tmp_path_factory.mktemp("data")
    live = LiveServer(create_ui_app(workdir, [str(tiny_dir), str(other)], annotator="alice", device="cpu",
                                    token=TOKEN, data_dirs=[data], chat_log=ChatLog(workdir / "logs"),
                                    run_configs=ui_run_configs()))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.get(f"{live.url}/?token={TOKEN}")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    assert "token" not in driver.current_url  # the page dropped it from the address bar; the cookie stays
    yield driver, live, workdir, Path(str(other)), data
    driver.quit()
    live.stop()


def el(driver, id_):
    return driver.find_element(By.ID, id_)


def fill(driver, id_, text):
    box = el(driver, id_)
    box.clear()
    box.send_keys(text)


def wait_text(driver, id_, predicate, timeout=120):
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: predicate(el(d, id_).text))
    return el(driver, id_).text


def screenshot(driver, name):
    folder = os.environ.get("POSTTRAIN_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def test_chat_streams_reply_and_arena_vote_is_saved(ui, tiny_dir):
    driver, live, workdir, other, _ = ui
    engine_model = live.server.config.app.state.models
    fill(driver, "chat-input", "Who are you?")
    el(driver, "send").click()
    wait_text(driver, "chat-status", lambda t: t == "done")
    engine = engine_model.engines[str(tiny_dir)]
    want = generate_reply(engine.model, engine.tokenizer, [Message("user", "Who are you?")], max_new_tokens=128)
    # textContent, not .text: the browser's rendered text turns a bare \r of random-model output into a line
    # break and folds tabs and the like
    assert f"assistant: {want}" in el(driver, "log-a").get_attribute("textContent")
    (logged,) = [json.loads(x) for x in (workdir / "logs" / "chat.jsonl").read_text().splitlines()]
    assert logged["user"] == "alice" and [r.strip() for r in logged["responses"]] == [want]  # annotator = user
    assert logged["messages"][-1] == {"role": "user", "content": "Who are you?"}

    el(driver, "clear").click()
    el(driver, "arena").click()
    fill(driver, "chat-input", "hi")
    el(driver, "send").click()
    wait_text(driver, "chat-status", lambda t: t == "done")
    assert "assistant:" in el(driver, "log-b").text
    screenshot(driver, "ui-chat.png")
    el(driver, "vote-b").click()
    wait_text(driver, "vote-status", lambda t: "saved" in t)
    vote = json.loads((workdir / "votes.jsonl").read_text().splitlines()[-1])
    assert vote["model_a"] == str(tiny_dir) and vote["model_b"] == str(other)
    assert (vote["prompt"], vote["winner"], vote["annotator"]) == ("hi", "model_b", "alice")
    assert vote["time"]


TURTLES = "I like\r\nturtles."


def test_rank_polish_skip_and_export(ui):
    driver, _, workdir, _, data = ui
    prompts = data / "cands.jsonl"
    # a \r\n shows as \n in a textarea; left untouched it is not an edit and stays as it was
    rows = [{"prompt": "Name a colour.", "responses": ["Blue.", TURTLES, "Red is a colour."]},
            {"prompt": "2+2?", "responses": ["4", "5"]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    driver.find_element(By.CSS_SELECTOR, "[data-tab=annotate]").click()
    fill(driver, "ann-file", str(prompts))
    el(driver, "ann-load").click()
    wait_text(driver, "ann-progress", lambda t: t.startswith("0/2"))
    for i, rank in enumerate([2, 3, 1]):
        fill(driver, f"rank-{i}", str(rank))
    fill(driver, "resp-0", "Blue is a colour.")  # polish the second-best answer
    screenshot(driver, "ui-annotate.png")
    el(driver, "ann-submit").click()
    wait_text(driver, "ann-progress", lambda t: t.startswith("1/2"))
    el(driver, "ann-skip").click()
    wait_text(driver, "ann-progress", lambda t: t.startswith("2/2"))
    el(driver, "ann-export").click()
    out = wait_text(driver, "ann-export-out", lambda t: "exported" in t, timeout=30)
    assert "exported 1 ranked items, 3 pairs, 1 SFT rows" in out
    ranked = [json.loads(x) for x in Path(out.splitlines()[1]).read_text().splitlines()]
    assert ranked == [{"prompt": "Name a colour.", "responses": ["Red is a colour.", "Blue is a colour.",
                                                                 TURTLES], "ranks": [0, 1, 2],
                       "id": "0", "annotator": "alice"}]
    pairs = [json.loads(x) for x in Path(out.splitlines()[2]).read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("Red is a colour.", "Blue is a colour."), ("Red is a colour.", TURTLES),
        ("Blue is a colour.", TURTLES)]
    (sft,) = [json.loads(x) for x in Path(out.splitlines()[3]).read_text().splitlines()]
    assert sft["messages"][1] == {"role": "assistant", "content": "Blue is a colour."} and sft["polished"]
    labels = (workdir / "annotations").glob("cands-*.labels.jsonl")
    records = [json.loads(x) for f in labels for x in f.read_text().splitlines()]
    assert [r["status"] for r in records] == ["ranked", "skipped"] and records[0]["edited"] == [0]


def test_generate_candidates_in_the_ui_then_rank_and_export(ui, tiny_dir):
    driver, _, workdir, _, data = ui
    prompts = data / "prompts.jsonl"
    prompts.write_text('{"id": "q1", "prompt": "Name a colour."}\n{"id": "q2", "prompt": "Who are you?"}\n')
    driver.find_element(By.CSS_SELECTOR, "[data-tab=annotate]").click()
    assert el(driver, "gen-model-0").is_selected() and not el(driver, "gen-model-1").is_selected()
    fill(driver, "gen-prompts", str(prompts))
    fill(driver, "gen-k", "3")
    fill(driver, "gen-temp", "1.0")
    fill(driver, "gen-max-tokens", "12")
    el(driver, "gen-start").click()
    wait_text(driver, "gen-status", lambda t: t.startswith("done: 2/2 prompts"))
    wait_text(driver, "ann-progress", lambda t: t.startswith("0/2"))  # loaded by itself when generation ended
    out = Path(el(driver, "ann-file").get_attribute("value"))
    assert out.parent == workdir / "candidates"
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2"]
    assert all(len(r["responses"]) == 3 and r["models"] == [str(tiny_dir)] * 3 for r in rows)
    assert "Name a colour." in el(driver, "ann-item").text
    shown = [r.replace("\r\n", "\n").replace("\r", "\n") for r in rows[0]["responses"]]  # a textarea's value
    assert [el(driver, f"resp-{i}").get_attribute("value") for i in range(3)] == shown

    driver.refresh()  # the server kept the generation; the page finds the file again
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    driver.find_element(By.CSS_SELECTOR, "[data-tab=annotate]").click()
    assert el(driver, "gen-status").text.startswith("done: 2/2 prompts")
    assert el(driver, "ann-file").get_attribute("value") == str(out)
    el(driver, "ann-load").click()
    wait_text(driver, "ann-progress", lambda t: t.startswith("0/2"))
    for i, rank in enumerate([2, 3, 1]):
        fill(driver, f"rank-{i}", str(rank))
    screenshot(driver, "ui-annotate-generated.png")
    el(driver, "ann-submit").click()
    wait_text(driver, "ann-progress", lambda t: t.startswith("1/2"))
    el(driver, "ann-export").click()
    export = wait_text(driver, "ann-export-out", lambda t: f"/{out.stem}-" in t, timeout=30)
    assert "exported 1 ranked items, 3 pairs" in export
    ranked = [json.loads(x) for x in Path(export.splitlines()[1]).read_text().splitlines()]
    best_first = [rows[0]["responses"][i] for i in (2, 0, 1)]
    assert ranked == [{"prompt": "Name a colour.", "responses": best_first, "ranks": [0, 1, 2], "id": "q1",
                       "annotator": "alice", "models": [str(tiny_dir)] * 3}]


def test_train_tab_preview_and_run_shows_loss(ui, tiny_dir):
    driver, _, workdir, _, folder = ui
    data = folder / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} " * 5}) + "\n" for i in range(12)))
    driver.find_element(By.CSS_SELECTOR, "[data-tab=train]").click()
    fill(driver, "tr-model", str(tiny_dir))
    fill(driver, "tr-data", str(data))
    fill(driver, "tr-steps", "4")
    fill(driver, "tr-overrides", "train.micro_batch_size=2\ndata.max_length=64")
    el(driver, "tr-preview").click()
    wait_text(driver, "tr-page", lambda t: t == "rows 1-5 of 12")
    assert "user: Say 0." in el(driver, "tr-rows").text
    el(driver, "tr-next").click()
    wait_text(driver, "tr-page", lambda t: t == "rows 6-10 of 12")
    assert "max_steps: 4" in wait_text(driver, "tr-yaml", lambda t: "max_steps" in t)
    el(driver, "tr-start").click()
    wait_text(driver, "tr-state", lambda t: t.startswith("finished"), timeout=240)
    assert "(exit 0)" in el(driver, "tr-state").text, el(driver, "tr-log").text
    assert "(step 4)" in el(driver, "tr-loss").text
    screenshot(driver, "ui-train.png")
    assert any((workdir / "runs").glob("*/logs/metrics.jsonl"))
