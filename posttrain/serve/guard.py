"""The checks every request to `posttrain serve` and `posttrain ui` passes before any route sees it.

One ASGI middleware, in this order:
- Host: a server bound to loopback (or to one named address) answers only Host headers naming it,
  localhost, 127.0.0.1 or [::1]; a web page whose DNS name was rebound to 127.0.0.1 is refused (403).
- Credentials (401): `serve --api-key KEY` wants `Authorization: Bearer KEY` on /v1 routes. The UI wants
  its token on every route: opening `/?token=T` sets an HttpOnly, SameSite=Strict cookie that the page's
  own requests then carry; scripts send `Authorization: Bearer T`.
- Writes (POST, PUT, PATCH, DELETE) need `Content-Type: application/json` (415): a cross-site form or a
  `text/plain` fetch cannot send that without a CORS preflight, and this server grants no CORS at all.
- Bodies over the limit get 413: at once from Content-Length, or while a chunked body streams in (the
  route stops reading at the limit; nothing past it is read, let alone buffered).
See SECURITY.md for the threat model.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, JSONResponse, Response

from posttrain.serve.schemas import ApiError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MIN_TOKEN_CHARS = 16
LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>posttrain ui</title>
<p>This page needs the UI's token. Open the address <code>posttrain ui</code> printed when it started
(<code>http://HOST:PORT/?token=...</code>), or the one made with the token you gave it
(<code>--token</code> or <code>POSTTRAIN_UI_TOKEN</code>).</p>"""


@dataclass(frozen=True)
class Policy:
    max_body_bytes: int
    hosts: frozenset[str] | None = LOOPBACK_NAMES  # Host names answered; None: any (a wildcard bind)
    api_key: str | None = None  # serve: Bearer KEY on /v1 routes
    token: str | None = None  # ui: the token on every route (cookie, Bearer, or ?token= on the page)


def hosts_for(bind: str) -> frozenset[str] | None:
    """Host names a server bound to `bind` answers to; None (any) for a wildcard bind such as 0.0.0.0."""
    bind = bind.strip().strip("[]").lower()
    if bind in ("", "0.0.0.0", "::"):
        return None
    return LOOPBACK_NAMES | {bind}


def is_loopback(bind: str) -> bool:
    bind = bind.strip().strip("[]").lower()
    try:
        return bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


def exposure_warning(bind: str, api_key: str | None) -> str | None:
    """The loud start-up warning for `posttrain serve` reachable from other machines with no key."""
    if api_key or is_loopback(bind):
        return None
    return (f"WARNING: posttrain serve listens on {bind} with no API key: anyone who can reach this port can use "
            "the model. Set --api-key (or POSTTRAIN_API_KEY), or bind 127.0.0.1 behind a proxy (see SECURITY.md).")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def cookie_name(token: str) -> str:
    """Per-token, so two UIs on one machine (cookies ignore the port) keep their own sessions."""
    return "posttrain_ui_" + hashlib.sha256(token.encode()).hexdigest()[:12]


def host_name(header: str) -> str:
    """'[::1]:7860' -> '::1', 'LocalHost:80' -> 'localhost', 'localhost.' -> 'localhost'."""
    header = header.strip().lower()
    if header.startswith("["):
        name, _, _ = header[1:].partition("]")
    else:
        name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


def _same(given: str | None, secret: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), secret.encode())


def _error(status: int, message: str, type_: str, code: str) -> JSONResponse:
    return ApiError(status, message, type_, code=code).response()


class BodyTooLarge(Exception):
    """Raised inside `receive` once a streamed body passes the limit; the guard answers 413."""


class Guard:
    """ASGI middleware applying a `Policy` to every HTTP request."""

    def __init__(self, app, policy: Policy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal, login = self._check(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if login:  # the page opened with a valid ?token=: it gets the session cookie with the page
            send = self._with_cookie(send)
        await self._capped(scope, receive, send)

    def _check(self, scope, headers: Headers) -> tuple[Response | None, bool]:
        """(a refusal, or None; whether this request logs in with ?token=)."""
        p = self.policy
        if p.hosts is not None and host_name(headers.get("host", "")) not in p.hosts:
            return _error(403, "this server does not answer to that Host header (DNS rebinding guard); use "
                          "http://127.0.0.1:PORT or http://localhost:PORT", "permission_error",
                          "host_not_allowed"), False
        path, login = scope["path"], False
        if p.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
            login = path == "/" and scope["method"] == "GET" and _same(query, p.token)
            cookie = cookie_parser(headers.get("cookie", "")).get(cookie_name(p.token))
            if not (login or _same(cookie, p.token) or _same(headers.get("authorization"), f"Bearer {p.token}")):
                if path == "/":
                    return HTMLResponse(LOGIN_PAGE, 401), False
                return _error(401, "this UI needs its token: open the URL posttrain ui printed (…/?token=…), or "
                              "send 'Authorization: Bearer TOKEN'", "authentication_error", "invalid_token"), False
        if p.api_key is not None and path.startswith("/v1") and \
                not _same(headers.get("authorization"), f"Bearer {p.api_key}"):
            return _error(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')",
                          "authentication_error", "invalid_api_key"), False
        if scope["method"] in WRITE_METHODS:
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return _error(415, f"send the request body as JSON with 'Content-Type: application/json' (got "
                              f"{media or 'none'!r})", "invalid_request_error", "unsupported_media_type"), False
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > p.max_body_bytes:
            return self._too_large(), False
        return None, login

    def _too_large(self) -> JSONResponse:
        return _error(413, f"Request body exceeds the limit of {self.policy.max_body_bytes} bytes",
                      "invalid_request_error", "request_too_large")

    def _with_cookie(self, send):
        value = (f"{cookie_name(self.policy.token)}={self.policy.token}; HttpOnly; SameSite=Strict; Path=/").encode()

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", value)]}
            await send(message)
        return send_with_cookie

    async def _capped(self, scope, receive, send):
        """Run the app with a `receive` that stops a body at the limit; then the reply is our 413,
        whatever the app made of the interrupted read."""
        limit, seen, over, started = self.policy.max_body_bytes, 0, False, False

        async def capped_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise BodyTooLarge
            return message

        async def checked_send(message):
            nonlocal started
            if over:  # the app's own answer to the broken read (400, 500) is replaced once, below
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, checked_send)
        except Exception:
            if not over:  # BodyTooLarge, or whatever the app raised from the interrupted read
                raise
        if over and not started:
            await self._too_large()(scope, receive, send)
