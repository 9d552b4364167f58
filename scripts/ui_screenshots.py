"""Hand-check `posttrain ui` on the real SmolLM2 in headless Chromium and save the README's screenshots.

Starts `posttrain ui` as its own process and drives each tab like a person would:
  Train:    3 LoRA steps of smollm2-135m-instruct on examples/data/general.jsonl (a real run folder)
  Chat:     arena, smollm2-135m-instruct against that run folder; one vote
  Annotate: K=3 candidates for 3 prompts, generated in the UI by both models; rank one item; export
and saves docs/ui-train.png, ui-chat.png, ui-annotate.png. Prints what it saw. A few minutes on 2 cores.

    PYTHONPATH=. python scripts/ui_screenshots.py [--out docs] [--workdir /tmp/posttrain-ui-shots] [--run DIR]

--run DIR reuses a run folder from an earlier pass (skips the Train tab and its screenshot).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
PROMPTS = ["Give me one tip for sleeping better.", "What is the capital of Italy?", "Describe a cat in one sentence."]
TOKEN = secrets.token_urlsafe(32)  # handed to `posttrain ui` in its environment, out of sight of `ps`


def get(url: str, timeout: float = 30):
    """GET a UI route the way a script does: with the token as a Bearer."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    return urllib.request.urlopen(request, timeout=timeout)


def start_ui(workdir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "ui", "--port", str(port), "--workdir",
                             str(workdir), "--model", MODEL, "--annotator", "lead", "--data-dir",
                             str(ROOT / "examples" / "data")], env={**os.environ, "POSTTRAIN_UI_TOKEN": TOKEN})
    for _ in range(240):
        try:
            get(f"http://127.0.0.1:{port}/ui/info", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("posttrain ui did not start")


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))


class Page:
    def __init__(self, driver):
        self.d = driver

    def el(self, id_):
        return self.d.find_element(By.ID, id_)

    def fill(self, id_, text):
        self.el(id_).clear()
        self.el(id_).send_keys(text)

    def wait(self, id_, predicate, timeout=600):
        WebDriverWait(self.d, timeout, poll_frequency=0.5).until(lambda d: predicate(self.el(id_).text))
        return self.el(id_).text

    def tab(self, name):
        self.d.find_element(By.CSS_SELECTOR, f"[data-tab={name}]").click()


def train(p: Page, out: Path) -> str:
    p.tab("train")
    p.fill("tr-model", MODEL)
    p.fill("tr-data", str(ROOT / "examples" / "data" / "general.jsonl"))
    p.fill("tr-steps", "3")
    p.fill("tr-overrides", "train.micro_batch_size=2\ndata.max_length=128\noptim.lr=1e-3")
    p.el("tr-preview").click()
    p.wait("tr-page", lambda t: t.startswith("rows 1-5"))
    p.el("tr-start").click()
    state = p.wait("tr-state", lambda t: t.startswith("finished"))
    print("train:", state, "| last loss:", p.el("tr-loss").text)
    p.d.save_screenshot(str(out / "ui-train.png"))
    return json.loads(get(p.d.current_url + "ui/train/status").read())["dir"]


def chat(p: Page, run_dir: str, out: Path) -> None:
    p.tab("chat")
    p.fill("model-a", MODEL)
    p.el("arena").click()
    p.fill("model-b", run_dir)
    p.fill("max-tokens", "64")
    p.fill("chat-input", "What is the capital of France?")
    p.el("send").click()
    p.wait("chat-status", lambda t: t in ("done",) or t.startswith("error"))
    print("chat A:", p.el("log-a").text.replace("\n", " | "))
    print("chat B:", p.el("log-b").text.replace("\n", " | "))
    p.d.save_screenshot(str(out / "ui-chat.png"))
    p.el("vote-tie").click()
    print("vote:", p.wait("vote-status", lambda t: "saved" in t, 30))


def annotate(p: Page, run_dir: str, workdir: Path, out: Path) -> None:
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS)))
    p.tab("annotate")
    p.fill("gen-prompts", str(prompts))
    p.fill("gen-extra", run_dir)
    p.fill("gen-max-tokens", "48")
    p.fill("gen-seed", "0")
    p.el("gen-start").click()
    print("generate:", p.wait("gen-status", lambda t: t.startswith(("done", "failed", "error"))))
    p.wait("ann-progress", lambda t: t.startswith("0/3"), 60)
    for i, rank in enumerate([2, 1, 3]):
        p.fill(f"rank-{i}", str(rank))
    p.d.execute_script("window.scrollTo(0, 0)")
    p.d.save_screenshot(str(out / "ui-annotate.png"))
    p.el("ann-submit").click()
    p.wait("ann-progress", lambda t: t.startswith("1/3"), 60)
    p.el("ann-export").click()
    export = p.wait("ann-export-out", lambda t: "exported" in t, 60)
    print("export:", export.replace("\n", " | "))
    print("ranked row:", Path(export.splitlines()[1]).read_text().strip())


@contextmanager
def ui_page(workdir: Path, port: int):
    """`posttrain ui` in its own process and a headless Chromium on its page; both stopped afterwards."""
    proc = start_ui(workdir, port)
    driver = browser()
    try:
        driver.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        yield Page(driver)
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--workdir", default="/tmp/posttrain-ui-shots")
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--run", help="an existing run folder: skip training")
    args = parser.parse_args()
    workdir, out = Path(args.workdir), Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    with ui_page(workdir, args.port) as p:
        run_dir = args.run or train(p, out)
        chat(p, run_dir, out)
        annotate(p, run_dir, workdir, out)


if __name__ == "__main__":
    main()
