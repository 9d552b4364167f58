"""The README's feedback-loop walk-through on SmolLM2-135M-Instruct (CPU): serve with --log-dir, a few
requests from two users, data from-logs, data candidates, data label with the example reward model, and a
reward model trained on the labels. Prints every command and its report.

    PYTHONPATH=. python scripts/feedback_walkthrough.py WORKDIR
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MODEL = "smollm2-135m-instruct"
REQUESTS = [("alice", "What is the capital of France?"), ("alice", "what is the capital of  France?"),
            ("alice", "My email is alice@example.com. Write a haiku about rain."),
            ("bob", "Name three primary colours."), ("bob", "Give me one tip for learning Python."),
            (None, "Explain what a reward model is in one sentence.")]


def posttrain(*args: str) -> str:
    print("$ posttrain " + " ".join(args), flush=True)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True)
    print(done.stdout[-3000:] + done.stderr[-1500:] + f"[exit {done.returncode}, {time.time() - start:.0f} s]\n",
          flush=True)
    done.check_returncode()
    return done.stdout


def serve_and_ask(work: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", MODEL, "--port", str(port),
                               "--log-dir", str(work / "logs")], stderr=subprocess.PIPE, text=True)
    print(f"$ posttrain serve {MODEL} --port {port} --log-dir {work / 'logs'}")
    print(server.stderr.readline().strip(), flush=True)  # the logging announcement
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            break
        except OSError:
            time.sleep(1)
    for user, prompt in REQUESTS:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 48,
                "temperature": 0} | ({"user": user} if user else {})
        req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=600).read())["choices"][0]["message"]["content"]
        print(f"  {user}: {prompt!r} -> {reply[:70]!r}", flush=True)
    server.send_signal(signal.SIGINT)
    server.wait(120)


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    serve_and_ask(work)
    posttrain("data", "from-logs", str(work / "logs"), "--out", str(work / "prompts.jsonl"))
    posttrain("data", "candidates", str(work / "prompts.jsonl"), "--models", MODEL, "--k", "3", "--temperature",
              "0.9", "--max-tokens", "48", "--seed", "0", "--out", str(work / "candidates.jsonl"))
    posttrain("train", "examples/rm_lora.yaml", f"output.dir={work / 'rm-example'}")
    posttrain("data", "label", str(work / "candidates.jsonl"), "--judge", str(work / "rm-example"),
              "--out", str(work / "ranked.jsonl"))
    posttrain("train", "examples/rm_lora.yaml", f"data.datasets=[{{path: {work / 'ranked.jsonl'}}}]",
              "data.val_size=0", f"output.dir={work / 'rm-from-labels'}")
    print(json.loads((work / "rm-from-labels" / "train_summary.json").read_text()))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
