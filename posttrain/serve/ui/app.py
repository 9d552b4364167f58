"""`posttrain ui`: one FastAPI app serving a plain HTML/JS page (no build step) and its JSON routes.

Chat and arena talk to the same OpenAI-compatible routes as `posttrain serve` (/v1/...), with
models loaded on first use; the Annotate tab's candidate generation uses those same engines.
Votes, generated candidates, annotation labels and UI-started runs live under `workdir`.
Every route wants the UI's token and passes the guard (serve/guard.py); every file and model a route
takes passes checks.py (inside --workdir / --data-dir; --model or runs inside the workdir).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from importlib import resources
from pathlib import Path

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse

from posttrain.errors import ConfigError
from posttrain.data.votes import human_vote
from posttrain.serve.api import ApiError, Models, create_app, load_engine, read_json
from posttrain.serve.chatlog import ChatLog
from posttrain.serve.guard import LOOPBACK_NAMES, MIN_TOKEN_CHARS, hosts_for, is_loopback, new_token
from posttrain.serve.ui.annotate import AnnotationTask
from posttrain.serve.ui.candidates import CandidateJob, GenSettings
from posttrain.serve.ui.checks import Allowed, int_field, text_field
from posttrain.serve.ui.training import RunConfigs, TrainJob, build_config, choices, preview

WINNERS = ("model_a", "model_b", "tie")


class UIState:
    def __init__(self, workdir: Path, model_names: list[str], annotator: str | None):
        self.workdir, self.model_names, self.annotator = workdir, list(model_names), annotator
        self.votes_path = workdir / "votes.jsonl"
        self.tasks: dict[str, AnnotationTask] = {}
        self.train_job: TrainJob | None = None
        self.gen_job: CandidateJob | None = None
        self.lock = threading.Lock()


def create_ui_app(workdir: str | Path = "ui-data", models: list[str] = (), annotator: str | None = None,
                  device: str | None = None, *, token: str | None = None, data_dirs: list[str] = (),
                  hosts: frozenset[str] | None = LOOPBACK_NAMES, chat_log: ChatLog | None = None,
                  run_configs: RunConfigs | None = None, dtype: str | None = None):
    """The UI app; `token` (None: a fresh random one, in `app.state.token`) is wanted on every route;
    `chat_log`: where chat requests are logged, with the annotator name as the user (None: nowhere);
    `run_configs`: the training config, for the Train tab (None: no Train tab); `dtype`: the chat models' weights
    (None: each run's model.dtype, as `posttrain chat --dtype`)."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the UI token must be at least {MIN_TOKEN_CHARS} characters (or leave it out: one is made)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    allowed = Allowed(workdir, data_dirs, models)
    state = UIState(workdir, list(models), annotator)
    token = token or new_token()
    app = create_app(Models(loader=lambda ref: load_engine(allowed.model(ref), name=ref, device=device, dtype=dtype)),
                     hosts=hosts, token=token, chat_log=chat_log)
    app.state.ui, app.state.token = state, token
    gen_lock = asyncio.Lock()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return resources.files("posttrain").joinpath("resources/ui/index.html").read_text(encoding="utf-8")

    @app.get("/ui/info")
    async def info():
        loaded = list(app.state.models.engines)
        return {"models": list(dict.fromkeys(state.model_names + loaded)), "annotator": state.annotator,
                **choices(run_configs), "workdir": str(workdir), "folders": [str(root) for root in allowed.roots]}

    @app.post("/ui/vote")
    async def vote(request: Request):
        body = await read_json(request)
        if body.get("winner") not in WINNERS:
            raise ApiError(400, f"winner must be one of {', '.join(WINNERS)}", param="winner")
        fields = [body.get(k) if isinstance(body.get(k), str) else None
                  for k in ("model_a", "model_b", "annotator", "prompt", "response_a", "response_b")]
        record = human_vote(fields[0], fields[1], body["winner"], *fields[2:])  # the format eval ratings reads
        with state.lock, state.votes_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return {"saved": str(state.votes_path)}

    # Sync handlers below do file and process work; FastAPI runs them on its thread pool.
    def task(body: dict) -> AnnotationTask:
        """The task named by body["task"]: one already open (by name or file), or a file the UI may read."""
        value = text_field(body, "task")
        with state.lock:
            if value in state.tasks:
                return state.tasks[value]
            source = allowed.file(value, "task")
            for t in state.tasks.values():
                if t.source == source:
                    return t
            t = AnnotationTask(source, workdir)
            state.tasks[t.name] = t
            return t

    @app.post("/ui/annotate/next")
    def annotate_next(body: dict = Depends(read_json)):
        t = task(body)
        item, progress = t.next_item(str(body.get("annotator") or ""))
        return {"task": t.name, "item": item.__dict__ if item else None, "progress": progress}

    @app.post("/ui/annotate/label")
    def annotate_label(body: dict = Depends(read_json)):
        t = task(body)
        label = t.label(str(body.get("item")), str(body.get("annotator") or ""), body.get("status"),
                        body.get("ranking"), body.get("edits"))
        return {"label": label, "progress": t.progress()}

    @app.post("/ui/annotate/export")
    def annotate_export(body: dict = Depends(read_json)):
        return task(body).export(sft=str(body.get("sft") or "polished"))

    @app.post("/ui/annotate/generate")
    async def annotate_generate(body: dict = Depends(read_json)):
        """Start generating K candidates per prompt with the chosen models (loaded here if need be)."""
        try:
            settings = GenSettings(k=int(body.get("k") or 3), temperature=float(body.get("temperature", 0.8)),
                                   top_p=float(body.get("top_p", 1.0)), max_tokens=int(body.get("max_tokens") or 128),
                                   seed=None if body.get("seed") in (None, "") else int(body["seed"]))
        except (TypeError, ValueError, OverflowError):
            raise ApiError(400, "K, temperature, top_p, max tokens and seed must be numbers") from None
        prompts = allowed.file(body.get("prompts"), "prompts")
        if not isinstance(body.get("models") or [], list):
            raise ApiError(400, "'models' must be a list of model names", param="models")
        names = list(dict.fromkeys(str(m).strip() for m in body.get("models") or [] if str(m).strip()))
        for name in names:  # all of them, before any is loaded
            allowed.model(name, "models")
        async with gen_lock:  # one generation at a time
            if state.gen_job is not None and state.gen_job.status()["running"]:
                raise ApiError(409, "candidates are being generated; stop that first", code="generation_in_progress")
            engines = {name: await app.state.models.get(name) for name in names}
            state.gen_job = await asyncio.to_thread(CandidateJob, prompts, engines, settings, workdir)
        return state.gen_job.status()

    @app.get("/ui/annotate/generate/status")
    def annotate_generate_status():
        return state.gen_job.status() if state.gen_job else {"running": False}

    @app.post("/ui/annotate/generate/stop")
    def annotate_generate_stop():
        if state.gen_job:
            state.gen_job.stop()
        return annotate_generate_status()

    @app.post("/ui/train/preview")
    def train_preview(body: dict = Depends(read_json)):
        return preview(allowed.file(body.get("data"), "data"), int_field(body, "page", 0, 0, 10**9),
                       int_field(body, "size", 5, 1, 100))

    @app.post("/ui/train/config")
    def train_config(body: dict = Depends(read_json)):
        _, text = build_config(body, allowed, run_configs)
        return {"yaml": text}

    @app.post("/ui/train/start")
    def train_start(body: dict = Depends(read_json)):
        tree, _ = build_config(body, allowed, run_configs)
        with state.lock:
            if state.train_job is not None and state.train_job.proc.poll() is None:
                raise ApiError(409, "a run is already going; stop it first", code="run_in_progress")
            state.train_job = TrainJob(tree, workdir)
        return state.train_job.status()

    @app.get("/ui/train/status")
    def train_status():
        return state.train_job.status() if state.train_job else {"running": False, "log": "", "loss": []}

    @app.post("/ui/train/stop")
    def train_stop():
        if state.train_job:
            state.train_job.stop()
        return train_status()

    return app


def run_ui(*, host: str = "127.0.0.1", port: int = 7860, models: list[str] = (), workdir: str = "ui-data",
           annotator: str | None = None, token: str | None = None, data_dirs: list[str] = (),
           chat_log: ChatLog | None = None, run_configs: RunConfigs | None = None, dtype: str | None = None) -> None:
    """`posttrain ui`: prints the address to open (with the token it made, like Jupyter), then serves."""
    import uvicorn  # heavy: uvicorn (~0.7 s), loaded only when the server starts

    app = create_ui_app(workdir, models, annotator, token=token, data_dirs=data_dirs, hosts=hosts_for(host),
                        chat_log=chat_log, run_configs=run_configs, dtype=dtype)
    if chat_log is not None:
        print(chat_log.announcement("posttrain ui", "the annotator name as the user"), flush=True)
    shown = "127.0.0.1" if hosts_for(host) is None else f"[{host}]" if ":" in host else host
    if token is None:
        print(f"posttrain ui on http://{shown}:{port}/?token={app.state.token}", flush=True)
    else:
        print(f"posttrain ui on http://{shown}:{port}/?token=... (the token from --token / POSTTRAIN_UI_TOKEN)",
              flush=True)
    if not is_loopback(host):
        print(f"WARNING: posttrain ui listens on {host}: other machines can reach it, and over plain http its token "
              "can be read on the network; put a TLS proxy in front (see SECURITY.md)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
