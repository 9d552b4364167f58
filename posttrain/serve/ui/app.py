"""`posttrain ui`: one FastAPI app serving a plain HTML/JS page (no build step) and its JSON routes.

Chat and arena talk to the same OpenAI-compatible routes as `posttrain serve` (/v1/...), with
models loaded on first use; the Annotate tab's candidate generation uses those same engines.
Votes, generated candidates, annotation labels and UI-started runs live under `workdir`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from importlib import resources
from pathlib import Path

from fastapi import Body, Request
from fastapi.responses import HTMLResponse

from posttrain.errors import PosttrainError
from posttrain.serve.api import ApiError, Models, create_app, load_engine
from posttrain.serve.ui.annotate import AnnotationTask
from posttrain.serve.ui.candidates import CandidateJob, GenSettings
from posttrain.serve.ui.training import TrainJob, build_config, choices, preview

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
                  device: str | None = None):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    state = UIState(workdir, list(models), annotator)
    app = create_app(Models(loader=lambda ref: load_engine(ref, name=ref, device=device)))
    app.state.ui = state
    gen_lock = asyncio.Lock()

    @app.exception_handler(PosttrainError)
    async def _user_error(request, err: PosttrainError):
        return ApiError(400, str(err)).response()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return resources.files("posttrain").joinpath("resources/ui/index.html").read_text(encoding="utf-8")

    @app.get("/ui/info")
    async def info():
        loaded = list(app.state.models.engines)
        return {"models": list(dict.fromkeys(state.model_names + loaded)), "annotator": state.annotator,
                **choices(), "workdir": str(workdir)}

    @app.post("/ui/vote")
    async def vote(request: Request):
        body = await request.json()
        if body.get("winner") not in WINNERS:
            raise ApiError(400, f"winner must be one of {', '.join(WINNERS)}", param="winner")
        record = {k: body.get(k) for k in ("model_a", "model_b", "prompt", "winner", "annotator")}
        record |= {"response_a": body.get("response_a"), "response_b": body.get("response_b"),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with state.lock, state.votes_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return {"saved": str(state.votes_path)}

    # Sync handlers below do file and process work; FastAPI runs them on its thread pool.
    def task(name_or_path: str) -> AnnotationTask:
        with state.lock:
            for t in state.tasks.values():
                if name_or_path in (t.name, str(t.source)):
                    return t
            t = AnnotationTask(name_or_path, workdir)
            state.tasks[t.name] = t
            return t

    @app.post("/ui/annotate/next")
    def annotate_next(body: dict = Body(...)):
        t = task(body["task"])
        item, progress = t.next_item(body.get("annotator") or "")
        return {"task": t.name, "item": item.__dict__ if item else None, "progress": progress}

    @app.post("/ui/annotate/label")
    def annotate_label(body: dict = Body(...)):
        t = task(body["task"])
        label = t.label(str(body["item"]), body.get("annotator") or "", body["status"], body.get("ranking"),
                        body.get("edits"))
        return {"label": label, "progress": t.progress()}

    @app.post("/ui/annotate/export")
    def annotate_export(body: dict = Body(...)):
        return task(body["task"]).export()

    @app.post("/ui/annotate/generate")
    async def annotate_generate(body: dict = Body(...)):
        """Start generating K candidates per prompt with the chosen models (loaded here if need be)."""
        try:
            settings = GenSettings(k=int(body.get("k") or 3), temperature=float(body.get("temperature", 0.8)),
                                   top_p=float(body.get("top_p", 1.0)), max_tokens=int(body.get("max_tokens") or 128),
                                   seed=None if body.get("seed") in (None, "") else int(body["seed"]))
        except (TypeError, ValueError):
            raise ApiError(400, "K, temperature, top_p, max tokens and seed must be numbers") from None
        names = list(dict.fromkeys(str(m).strip() for m in body.get("models") or [] if str(m).strip()))
        async with gen_lock:  # one generation at a time
            if state.gen_job is not None and state.gen_job.status()["running"]:
                raise ApiError(409, "candidates are being generated; stop that first", code="generation_in_progress")
            engines = {name: await app.state.models.get(name) for name in names}
            state.gen_job = await asyncio.to_thread(CandidateJob, body.get("prompts") or "", engines, settings,
                                                    workdir)
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
    def train_preview(body: dict = Body(...)):
        return preview(body["data"], int(body.get("page", 0)), int(body.get("size", 5)))

    @app.post("/ui/train/config")
    def train_config(body: dict = Body(...)):
        _, text = build_config(body, workdir)
        return {"yaml": text}

    @app.post("/ui/train/start")
    def train_start(body: dict = Body(...)):
        cfg, _ = build_config(body, workdir)
        with state.lock:
            if state.train_job is not None and state.train_job.proc.poll() is None:
                raise ApiError(409, "a run is already going; stop it first", code="run_in_progress")
            state.train_job = TrainJob(cfg, workdir)
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
           annotator: str | None = None) -> None:
    import uvicorn

    app = create_ui_app(workdir, models, annotator)
    print(f"posttrain ui on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
