"""Every request to `posttrain ui` and `posttrain serve` passes the guard first: the UI's token, the Host
header (DNS rebinding), a JSON content type on writes (cross-site form posts), no CORS grant, and a body
cap that holds while a chunked body streams in (in-process ASGI calls; no model is loaded)."""

import json

import pytest
from inprocess import call

from posttrain.cli import main
from posttrain.serve.api import Limits, Models, create_app
from posttrain.serve.ui.app import create_ui_app

TOKEN = "test-token-0123456789abcdef"
BEARER = {"authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
VOTE = json.dumps({"winner": "tie", "prompt": "hi"}).encode()


@pytest.fixture
def ui(tmp_path):
    return create_ui_app(tmp_path / "work", token=TOKEN), tmp_path / "work"


def test_ui_refuses_every_route_without_its_token(ui):
    app, workdir = ui
    page = call(app, "GET", "/")
    assert page.status == 401 and b'id="send"' not in page.body and b"?token=" in page.body  # says how to get in
    assert call(app, "GET", "/?token=wrong-token-0123456789").status == 401
    for method, path in (("GET", "/ui/info"), ("GET", "/v1/models"), ("GET", "/ui/train/status"),
                         ("POST", "/ui/vote"), ("POST", "/ui/train/stop"), ("GET", "/docs"), ("GET", "/openapi.json")):
        reply = call(app, method, path, headers=JSON, body=VOTE if method == "POST" else None)
        assert reply.status == 401, path
        if path.startswith(("/ui", "/v1")):
            assert reply.json()["error"]["type"] == "authentication_error"
    wrong = call(app, "GET", "/ui/info", headers={"authorization": "Bearer nope", "cookie": "x=1"})
    assert wrong.status == 401
    assert not (workdir / "votes.jsonl").exists()


def test_ui_token_in_the_url_sets_a_strict_httponly_cookie(ui):
    app, workdir = ui
    page = call(app, "GET", f"/?token={TOKEN}")
    assert page.status == 200 and b'id="send"' in page.body
    cookie = page.header("set-cookie")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie.replace("samesite=strict", "SameSite=Strict")
    (name, value), = page.cookies.items()
    assert value == TOKEN
    with_cookie = {"cookie": f"{name}={value}"}
    assert call(app, "GET", "/", headers=with_cookie).status == 200  # a reload needs no token in the URL
    assert call(app, "GET", "/ui/info", headers=with_cookie).status == 200
    assert call(app, "GET", "/ui/info", headers=BEARER).status == 200  # scripts send the token as a Bearer
    assert call(app, "GET", "/ui/info", headers={"cookie": f"{name}=forged"}).status == 401
    assert call(app, "POST", "/ui/vote", headers=with_cookie | JSON, body=VOTE).status == 200
    assert json.loads((workdir / "votes.jsonl").read_text())["winner"] == "tie"


def test_ui_generates_a_token_when_none_is_given(tmp_path):
    one, two = create_ui_app(tmp_path / "a"), create_ui_app(tmp_path / "b")
    assert len(one.state.token) >= 32 and one.state.token != two.state.token
    assert call(one, "GET", "/ui/info").status == 401
    assert call(one, "GET", "/ui/info", headers={"authorization": f"Bearer {one.state.token}"}).status == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:7860", "127.0.0.1.evil.example:7860", "",
                                  "localhost.:1:2"])
def test_wrong_host_header_is_refused(ui, host):
    app, _ = ui
    reply = call(app, "GET", "/ui/info", headers=BEARER, host=host)
    assert reply.status == 403 and reply.json()["error"]["code"] == "host_not_allowed"
    serve = create_app(Models())
    assert call(serve, "GET", "/v1/models", host=host).status == 403


@pytest.mark.parametrize("host", ["127.0.0.1:7860", "localhost:7860", "LOCALHOST", "[::1]:7860", "127.0.0.1"])
def test_loopback_host_headers_are_served(ui, host):
    app, _ = ui
    assert call(app, "GET", "/ui/info", headers=BEARER, host=host).status == 200
    assert call(create_app(Models()), "GET", "/v1/models", host=host).status == 200


def test_a_wildcard_bind_answers_any_host_but_still_wants_the_token(tmp_path):
    app = create_ui_app(tmp_path, token=TOKEN, hosts=None)
    assert call(app, "GET", "/ui/info", headers=BEARER, host="box.lan:7860").status == 200
    assert call(app, "GET", "/ui/info", host="box.lan:7860").status == 401
    assert call(create_app(Models(), hosts=None), "GET", "/v1/models", host="box.lan:8000").status == 200


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   "application/jsonp", "text/plain; a=application/json"])
def test_writes_need_a_json_content_type(ui, ctype):
    app, workdir = ui
    headers = BEARER | ({"content-type": ctype} if ctype else {})
    reply = call(app, "POST", "/ui/vote", headers=headers, body=VOTE)
    assert reply.status == 415 and reply.json()["error"]["code"] == "unsupported_media_type"
    assert not (workdir / "votes.jsonl").exists()
    serve = call(create_app(Models()), "POST", "/v1/chat/completions", headers=headers, body=b"{}")
    assert serve.status == 415
    ok = call(app, "POST", "/ui/vote", headers=BEARER | {"content-type": "Application/JSON; charset=utf-8"}, body=VOTE)
    assert ok.status == 200


def test_no_cross_origin_grant(ui):
    app, _ = ui
    origin = {"origin": "http://evil.example"}
    preflight = call(app, "OPTIONS", "/ui/vote", headers=BEARER | origin | {"access-control-request-method": "POST"})
    answered = call(app, "GET", "/ui/info", headers=BEARER | origin)
    serve = call(create_app(Models()), "GET", "/v1/models", headers=origin)
    for reply in (preflight, answered, serve):
        assert not [k for k, _ in reply.headers if k.startswith("access-control-")]
    assert preflight.status >= 400


def endless(chunk: int, count: int):
    for _ in range(count):
        yield b"x" * chunk


def test_oversized_bodies_get_413_without_being_read(ui):
    app, _ = ui
    limit = Limits().max_body_bytes
    declared = call(app, "POST", "/ui/vote", headers=BEARER | JSON | {"content-length": str(limit + 1)},
                    chunks=endless(65536, 40))
    assert declared.status == 413 and declared.pulled == 0
    streamed = call(app, "POST", "/ui/vote", headers=BEARER | JSON, chunks=endless(65536, 4 * limit // 65536))
    assert streamed.status == 413 and streamed.json()["error"]["code"] == "request_too_large"
    assert limit < streamed.pulled <= limit + 65536  # it stopped reading at the cap, not at the end


def test_serve_caps_a_chunked_body_while_it_streams():
    app = create_app(Models(), limits=Limits(max_body_bytes=20_000))
    reply = call(app, "POST", "/v1/chat/completions", headers=JSON, chunks=endless(4096, 200))
    assert reply.status == 413 and reply.json()["error"]["code"] == "request_too_large"
    assert reply.pulled <= 20_000 + 4096  # of the 800 KB the client would send
    small = call(app, "POST", "/v1/chat/completions", headers=JSON, chunks=[b'{"model": "x", ', b'"messages": []}'])
    assert small.status == 400  # a small chunked body is read and validated as usual


def test_serve_keeps_its_api_key():
    app = create_app(Models(), api_key="sk-1")
    assert call(app, "GET", "/v1/models").status == 401
    assert call(app, "GET", "/v1/models", headers={"authorization": "Bearer sk-1"}).status == 200


def run_cli(monkeypatch, argv: list[str]) -> dict:
    """main(argv) with uvicorn.run replaced: returns what it would have served."""
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    seen["rc"] = main(argv)
    return seen


def test_serve_on_all_interfaces_without_a_key_warns(monkeypatch, capsys, tiny_dir):
    monkeypatch.delenv("POSTTRAIN_API_KEY", raising=False)
    seen = run_cli(monkeypatch, ["serve", str(tiny_dir), "--host", "0.0.0.0", "--name", "tiny"])
    err = capsys.readouterr().err
    assert seen["rc"] == 0 and seen["host"] == "0.0.0.0" and "WARNING" in err and "--api-key" in err
    assert call(seen["app"], "GET", "/v1/models", host="box.lan:8000").status == 200  # any name reaches it
    seen = run_cli(monkeypatch, ["serve", str(tiny_dir), "--host", "0.0.0.0", "--api-key", "sk-1", "--name", "t"])
    assert "WARNING" not in capsys.readouterr().err
    seen = run_cli(monkeypatch, ["serve", str(tiny_dir), "--name", "tiny"])
    assert "WARNING" not in capsys.readouterr().err and seen["host"] == "127.0.0.1"
    assert call(seen["app"], "GET", "/v1/models", host="evil.example:8000").status == 403


def test_serve_max_batch_reaches_the_engine_and_must_be_positive(monkeypatch, capsys, tiny_dir):
    seen = run_cli(monkeypatch, ["serve", str(tiny_dir), "--max-batch", "3"])
    engine = next(iter(seen["app"].state.models.engines.values()))
    try:
        assert seen["rc"] == 0 and engine.max_batch == 3 and engine.batcher.max_rows == 3
    finally:
        engine.close()
    assert main(["serve", str(tiny_dir), "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "posttrain: error: --max-batch must be >= 1, got 0" and "Traceback" not in "".join(err)


def test_ui_cli_prints_a_url_with_a_fresh_token(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("POSTTRAIN_UI_TOKEN", raising=False)
    seen = run_cli(monkeypatch, ["ui", "--workdir", str(tmp_path), "--port", "7999"])
    out = capsys.readouterr().out
    token = seen["app"].state.token
    assert seen["rc"] == 0 and seen["host"] == "127.0.0.1" and f"http://127.0.0.1:7999/?token={token}" in out
    monkeypatch.setenv("POSTTRAIN_UI_TOKEN", TOKEN)
    seen = run_cli(monkeypatch, ["ui", "--workdir", str(tmp_path)])
    assert seen["app"].state.token == TOKEN and TOKEN not in capsys.readouterr().out  # the user knows it already
    seen = run_cli(monkeypatch, ["ui", "--workdir", str(tmp_path), "--token", "short"])
    assert seen["rc"] == 2 and "at least 16 characters" in capsys.readouterr().err
    seen = run_cli(monkeypatch, ["ui", "--workdir", str(tmp_path), "--data-dir", str(tmp_path / "missing")])
    assert seen["rc"] == 2 and "--data-dir" in capsys.readouterr().err
