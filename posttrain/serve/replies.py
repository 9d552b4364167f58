"""An engine job's result as an OpenAI response: JSON, or server-sent events while it generates.

A client that disconnects cancels its job (the worker skips it, or stops it between tokens).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from posttrain.serve.engine import Engine, EngineClosed, Job
from posttrain.serve.schemas import ApiError

INTERNAL_ERROR = "The server had an error while processing your request"


async def wait_result(engine: Engine, job: Job, request: Request):
    """The job's result. If the client disconnects first, the job is cancelled (the worker skips it,
    or stops it between tokens) and the handler ends with a 499 that nobody reads."""
    try:
        future = engine.submit(job)
    except EngineClosed as err:
        raise ApiError(503, str(err), "server_error", code="shutting_down") from err
    result = asyncio.wrap_future(future)
    gone = asyncio.create_task(_client_gone(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not result.done():
        job.cancelled = True
        raise ApiError(499, "the client closed the connection before its reply was ready",
                       code="client_closed_request")
    return result.result()


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected: with the body read, receive() waits for just that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(prompt_len: int, gens) -> dict:
    completion = sum(len(g.token_ids) for g in gens)
    return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}


async def respond(engine: Engine, job: Job, req, request: Request, *, chat: bool, log=None):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": engine.name}
    if req.stream:
        return StreamingResponse(_stream(engine, job, req, head, chat, log), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    gens = await wait_result(engine, job, request)
    if log is not None:
        log(gens)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason,
                    "logprobs": None} for i, g in enumerate(gens)]
    else:
        prefix = req.prompt if req.echo else ""
        choices = [{"index": i, "text": prefix + g.text, "finish_reason": g.finish_reason, "logprobs": None}
                   for i, g in enumerate(gens)]
    return {**head, "choices": choices, "usage": _usage(len(job.prompt_ids), gens)}


async def _stream(engine: Engine, job: Job, req, head: dict, chat: bool, log=None):
    """SSE: one chunk per streamed piece, a final chunk with finish_reason per choice, then [DONE]."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    job.on_text = lambda index, text: loop.call_soon_threadsafe(pieces.put_nowait, (index, text))
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(index: int, text: str | None, finish: str | None = None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    try:
        future = engine.submit(job)
    except EngineClosed as err:
        yield f"data: {json.dumps(ApiError(503, str(err), 'server_error').body)}\n\n"
        return
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
    try:
        # Choices stream one after another; the worker finishes choice i before starting i + 1.
        if chat:
            for index in range(job.n):
                yield chunk(index, None, first=True)
        while (item := await pieces.get()) is not None:
            yield chunk(*item)
        if future.exception() is not None:  # the engine logged it; the client learns no internals
            yield f"data: {json.dumps(ApiError(500, INTERNAL_ERROR, 'server_error').body)}\n\n"
            return
        gens = future.result()
        if log is not None:
            log(gens)
        for index, gen in enumerate(gens):
            yield chunk(index, None, gen.finish_reason)
        if req.include_usage():
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(len(job.prompt_ids), gens)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # a client that left stops its generation at the next token
