"""One HTTP request through an ASGI app in this process (no server, no HTTP client library).

The body goes in as ASGI messages pulled one at a time, so a test can count how much of a body the
app read before it answered: `chunks` (any iterable, e.g. a generator far larger than the limit) is
sent like a chunked upload without Content-Length; `body` is sent whole with its Content-Length.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    pulled: int = 0  # body bytes the app read
    cookies: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)

    def json(self) -> dict:
        return json.loads(self.body)


def call(app, method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes | None = None,
         chunks=None, host: str = "127.0.0.1:7860") -> Reply:
    return asyncio.run(_call(app, method, path, headers or {}, body, chunks, host))


async def _call(app, method, path, headers, body, chunks, host) -> Reply:
    path, _, query = path.partition("?")
    raw = [(b"host", host.encode())] if host else []
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if chunks is None:
        body = body or b""
        raw.append((b"content-length", str(len(body)).encode()))
        chunks = [body]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "headers": raw,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 7860), "root_path": ""}
    parts, pulled, finished = iter(chunks), 0, asyncio.Event()
    reply = Reply(0, [], b"")
    body_done = False

    async def receive():
        nonlocal pulled, body_done
        if body_done:  # the client stays until the reply is complete, then leaves
            await finished.wait()
            return {"type": "http.disconnect"}
        piece = next(parts, None)
        if piece is None:
            body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(piece)
        return {"type": "http.request", "body": piece, "more_body": True}

    async def send(message):
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = [(k.decode().lower(), v.decode()) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            reply.body += message.get("body", b"")
            if not message.get("more_body"):
                finished.set()

    await app(scope, receive, send)
    finished.set()
    reply.pulled = pulled
    for name, value in reply.headers:
        if name == "set-cookie":
            key, _, rest = value.partition("=")
            reply.cookies[key] = rest.split(";", 1)[0]
    return reply
