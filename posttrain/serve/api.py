"""OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions (+ SSE), /v1/completions, /v1/score.

Handlers validate, render prompts with the training templates (`encode_prompt`), and hand the work to
an `Engine` (one worker thread per model, batched). Errors use OpenAI's body:
{"error": {"message", "type", "param", "code"}}: 4xx for anything a request got wrong (out-of-range numbers,
text that is not valid Unicode, a prompt too long for the context), and a 500 that names no internals.
`posttrain serve` and `posttrain ui` both use it, behind `guard.Guard` (Host, credentials, JSON, body cap).
A client that disconnects before its reply is ready (a timeout, a retry) cancels its job, streaming
or not: the engine skips it if it has not started and stops generating for it between tokens.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from posttrain.errors import PosttrainError
from posttrain.models.vision_load import image_inputs_of
from posttrain.records import Message
from posttrain.serve.chatlog import ChatLog, request_logger
from posttrain.serve.engine import Engine, Job, Sampling
from posttrain.serve.replies import INTERNAL_ERROR, respond, wait_result
from posttrain.serve.guard import LOOPBACK_NAMES, Guard, Policy, exposure_warning, hosts_for
from posttrain.serve.schemas import ApiError, ChatRequest, CompletionRequest, ScoreRequest, read_json, request_images
from posttrain.templates.render import encode_prompt, apply_template
from posttrain.models.load import is_reward_model, load_reward_model, pick_device
from posttrain.models.run import load_model_for_inference, find_run_config, read_run
from posttrain.models.config import ModelConfig


@dataclass
class Limits:
    max_tokens: int = 1024  # cap on generated tokens per choice
    default_max_tokens: int = 256  # when the request gives none
    max_n: int = 8  # choices per request
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON is far beyond any chat prompt this serves


class Models:
    """The engines this app serves, by name; `loader` (optional) starts new ones on first use (the UI)."""

    def __init__(self, engines: dict[str, Engine] | None = None, loader: Callable[[str], Engine] | None = None):
        self.engines = dict(engines or {})
        self.loader = loader
        self.lock = asyncio.Lock()

    async def get(self, name: str) -> Engine:
        if name in self.engines:
            return self.engines[name]
        if self.loader is None:
            raise ApiError(404, f"The model '{name}' does not exist; GET /v1/models lists the served ones",
                           param="model", code="model_not_found")
        async with self.lock:  # two tabs asking for the same new model load it once
            if name not in self.engines:
                try:
                    self.engines[name] = await asyncio.to_thread(self.loader, name)
                except PosttrainError as err:
                    raise ApiError(404, str(err), param="model", code="model_not_found") from err
        return self.engines[name]

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def create_app(models: Models, *, api_key: str | None = None, limits: Limits | None = None,
               hosts: frozenset[str] | None = LOOPBACK_NAMES, token: str | None = None,
               chat_log: ChatLog | None = None) -> FastAPI:
    """The API app. `hosts`: Host names answered (None: any, for a wildcard bind); `token`: the UI's token,
    wanted on every route (see guard.py); `chat_log`: where answered requests are logged (None: nowhere)."""
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped accepting and drained in-flight requests; now finish queued jobs.
        await asyncio.to_thread(models.close)

    app = FastAPI(title="posttrain", lifespan=lifespan)
    app.state.models = models
    app.add_middleware(Guard, policy=Policy(limits.max_body_bytes, hosts, api_key, token))

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return err.response()

    @app.exception_handler(PosttrainError)
    async def _user_error(request, err: PosttrainError):  # a template or data problem the request caused
        return ApiError(400, str(err)).response()

    @app.exception_handler(Exception)
    async def _internal(request, err: Exception):
        # Still an OpenAI-shaped body, so clients report it; the details go to the server's log (uvicorn
        # logs the exception this handler re-raises), never to the client.
        return _error(500, INTERNAL_ERROR, "server_error")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "posttrain"} for name in models.engines]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, ChatRequest, limits)
        engine = _generator(await models.get(req.model))
        images = request_images(req, engine.name, takes_images=image_inputs_of(engine.model) is not None)
        messages = [m.to_message() for m in req.messages]
        prompt_ids = encode_prompt(messages, engine.tokenizer, system=engine.system)
        sampling = _sampling(req, req.max_completion_tokens or req.max_tokens, len(prompt_ids), engine, limits)
        job = Job(prompt_ids, req.n, sampling, images=images)
        log = request_logger(chat_log, engine.name, req.user, endpoint="chat",
                             messages=[{"role": m.role, "content": m.content} for m in messages])
        return await respond(engine, job, req, request, chat=True, log=log)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest, limits)
        engine = _generator(await models.get(req.model))
        if not isinstance(req.prompt, str):
            if len(req.prompt) != 1:
                raise ApiError(400, "this server takes one prompt per request", param="prompt")
            req.prompt = req.prompt[0]
        prompt_ids = list(engine.tokenizer(req.prompt, add_special_tokens=False)["input_ids"])
        if not prompt_ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        sampling = _sampling(req, req.max_tokens or 16, len(prompt_ids), engine, limits)
        job = Job(prompt_ids, req.n, sampling, strip=False)
        log = request_logger(chat_log, engine.name, req.user, endpoint="completions", prompt=req.prompt)
        return await respond(engine, job, req, request, chat=False, log=log)

    @app.post("/v1/score")
    async def score(request: Request):
        req = await _parse(request, ScoreRequest, limits)
        engine = await models.get(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        messages = [Message("user", req.prompt)] if req.prompt is not None else [m.to_message() for m in req.messages]
        lengths = await asyncio.to_thread(lambda: [len(engine.score_ids(messages, r).input_ids) for r in req.responses])
        for i, length in enumerate(lengths):
            if engine.context_length and length > engine.context_length:
                raise ApiError(400, f"This model's maximum context length is {engine.context_length} tokens; the "
                               f"prompt with response {i} has {length}", param=f"responses.{i}",
                               code="context_length_exceeded")
        job = Job([], 1, Sampling(), score=(messages, req.responses))
        scores = await wait_result(engine, job, request)
        return {"object": "list", "model": engine.name, "score_type": engine.score_kind,
                "data": [{"index": i, "score": s} for i, s in enumerate(scores)]}

    return app


def _generator(engine: Engine) -> Engine:
    if engine.score_kind == "reward":
        raise ApiError(400, f"model {engine.name!r} is a reward model: it answers /v1/score only", param="model")
    return engine


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(ApiError(status, message, type_, param, code).body, status_code=status)


async def _parse(request: Request, schema: type[BaseModel], limits: Limits):
    data = await read_json(request)
    try:
        req = schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"Invalid value for '{param}': {first['msg']}", param=param) from None
    if getattr(req, "n", 1) > limits.max_n:
        raise ApiError(400, f"n must be at most {limits.max_n}", param="n")
    return req


def _sampling(req, max_tokens: int | None, prompt_len: int, engine: Engine, limits: Limits) -> Sampling:
    max_tokens = max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                       param="max_tokens")
    if engine.context_length and prompt_len + max_tokens > engine.context_length:
        raise ApiError(400, f"This model's maximum context length is {engine.context_length} tokens; the prompt has "
                       f"{prompt_len} and max_tokens asks for {max_tokens}", param="messages",
                       code="context_length_exceeded")
    return Sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                    stop=tuple(req.stop or ()))


def load_engine(ref: str, name: str | None = None, device: str | None = None,
                trust_remote_code: bool = False, dtype: str | None = None, max_batch: int = 32) -> Engine:
    """Load any model reference (run, folder, built-in, hub id) into a started engine. The folder's own code
    (config.json auto_map) runs only with `trust_remote_code`, from the user's command line; `dtype` overrides
    the run's model.dtype (or auto); `max_batch`: rows decoded together."""
    if is_reward_model(ref):  # a reward-model folder serves /v1/score with its head, not as a causal LM
        model, tokenizer, cfg = _load_reward_engine_model(ref, device, trust_remote_code, dtype)
    else:
        model, tokenizer, cfg = load_model_for_inference(ref, device=device, trust_remote_code=trust_remote_code,
                                                         dtype=dtype)
    system = cfg.template.system if cfg is not None else None  # render exactly as the run trained
    return Engine(model, tokenizer, name or Path(ref).name or ref, system=system, max_batch=max_batch)


def _load_reward_engine_model(ref: str, device: str | None, trust_remote_code: bool = False,
                              dtype: str | None = None):
    """(reward model in eval mode, tokenizer, the run's config or None), rendering as the run trained."""
    cfg_path = find_run_config(Path(ref).expanduser())
    cfg = read_run(cfg_path) if cfg_path is not None else None
    dtype = dtype or (cfg.model.dtype if cfg is not None else "auto")
    model_cfg = ModelConfig(name_or_path=str(ref), trust_remote_code=trust_remote_code, dtype=dtype)
    model, tokenizer = load_reward_model(model_cfg, pick_device(device or "auto"))
    if cfg is not None:
        apply_template(tokenizer, cfg.template.name)
    return model.eval(), tokenizer, cfg


def serve(ref: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          name: str | None = None, limits: Limits | None = None, chat_log: ChatLog | None = None,
          trust_remote_code: bool = False, dtype: str | None = None, max_batch: int = 32) -> None:
    """`posttrain serve`: load the model, then answer until Ctrl-C / SIGTERM (graceful: queued jobs finish)."""
    import uvicorn  # heavy: uvicorn (~0.7 s), loaded only when the server starts

    if max_batch < 1:
        raise PosttrainError(f"--max-batch must be >= 1, got {max_batch}")

    warning = exposure_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if chat_log is not None:
        print(chat_log.announcement("posttrain serve"), file=sys.stderr, flush=True)
    engine = load_engine(ref, name, trust_remote_code=trust_remote_code, dtype=dtype, max_batch=max_batch)
    app = create_app(Models({engine.name: engine}), api_key=api_key, limits=limits, hosts=hosts_for(host),
                     chat_log=chat_log)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=60)
