"""What the web UI may touch: Train-tab overrides from an allowlist (no code references, no remote code,
no paths), run names that stay inside <workdir>/runs, files inside --workdir or a --data-dir folder
(symlinks resolved first), and models given with --model or run folders inside the workdir."""

import json
import shutil

import pytest
from inprocess import call

from posttrain.cli import ui_run_configs
from posttrain.train.config import describe_keys
from posttrain.serve.ui.app import create_ui_app
from posttrain.serve.ui.training import OVERRIDE_KEYS

TOKEN = "test-token-0123456789abcdef"
HEADERS = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
SECRET = "the-secret-row-text"


@pytest.fixture
def site(tmp_path, tiny_dir, monkeypatch):
    """A workdir, one --data-dir folder with a good file, and a secret file outside both."""
    work, data, outside = tmp_path / "work", tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    row = json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n"
    (data / "ok.jsonl").write_text(row * 3)
    (outside / "secret.jsonl").write_text(json.dumps({"instruction": SECRET, "output": SECRET}) + "\n")
    (outside / "cands.jsonl").write_text(json.dumps({"prompt": SECRET, "responses": ["a", "b"]}) + "\n")
    (data / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (data / "linked-folder").symlink_to(outside)
    monkeypatch.chdir(data)  # relative paths are read from where `posttrain ui` was started
    app = create_ui_app(work, [str(tiny_dir)], token=TOKEN, data_dirs=[data], device="cpu",
                        run_configs=ui_run_configs())
    return app, work, data, outside


def post(app, path: str, body: dict):
    return call(app, "POST", path, headers=HEADERS, body=json.dumps(body).encode())


def form(data: str, **extra) -> dict:
    return {"stage": "sft", "model": extra.pop("model", "tiny-random"), "method": "lora", "data": data,
            "max_steps": 2} | extra


@pytest.mark.parametrize("override", ["reward.function=pty:spawn", "reward.function=evil.py:run",
                                      "model.trust_remote_code=true", "output.dir=/tmp/x", "train.resume=/tmp/ckpt",
                                      "model.attn_implementation=kernels-community/x", "model.revision=evil",
                                      "data.datasets=[{path: /etc/passwd}]", "reward.url=http://10.0.0.1/",
                                      "model={name_or_path: x, trust_remote_code: true}", "optim={lr: 1}",
                                      "rm.normalize_data=/etc/passwd", "ppo.ptx_datasets=[{path: /x}]"])
def test_train_overrides_outside_the_allowlist_are_refused(site, tiny_dir, override):
    app, work, data, _ = site
    body = form(str(data / "ok.jsonl"), model=str(tiny_dir), overrides=f"optim.lr=1e-3\n{override}")
    for path in ("/ui/train/config", "/ui/train/start"):
        reply = post(app, path, body)
        assert reply.status == 400, (path, reply.body)
        assert override.split("=")[0] in reply.json()["error"]["message"]
    assert app.state.ui.train_job is None and not (work / "runs").exists()  # nothing started or written


def test_allowed_overrides_build_the_config(site, tiny_dir):
    app, work, data, _ = site
    body = form(str(data / "ok.jsonl"), model=str(tiny_dir), name="my-run_1.2",
                overrides="optim.lr=1e-3\ntrain.micro_batch_size=2\nlora.r=4\ndata.max_length=64\n\n")
    reply = post(app, "/ui/train/config", body)
    assert reply.status == 200, reply.body
    text = reply.json()["yaml"]
    assert f"dir: {work.resolve() / 'runs' / 'my-run_1.2'}" in text and "lr: 0.001" in text and "r: 4" in text
    assert f"path: {(data / 'ok.jsonl').resolve()}" in text


def test_without_run_configs_there_is_no_train_tab(site, tiny_dir):
    """serve never imports train: the CLI hands the training config in; an app built without it trains nothing."""
    _, work, data, _ = site
    app = create_ui_app(work, [str(tiny_dir)], token=TOKEN, data_dirs=[data], device="cpu")
    for path in ("/ui/train/config", "/ui/train/start"):
        reply = post(app, path, form(str(data / "ok.jsonl"), model=str(tiny_dir)))
        assert reply.status == 404 and reply.json()["error"]["code"] == "no_training"
    assert app.state.ui.train_job is None and not (work / "runs").exists()


def test_every_allowlisted_override_is_a_config_key():
    assert OVERRIDE_KEYS <= {key for key, _, _ in describe_keys()}
    assert not [k for k in OVERRIDE_KEYS if k.startswith(("reward.function", "reward.url", "reward.type", "model.trust",
                                                           "model.attn", "output.dir", "train.resume", "eval."))]


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", "..", ".hidden", "a\\b", "x" * 101, "ru n"])
def test_run_name_must_be_a_plain_name(site, tiny_dir, name):
    app, work, data, _ = site
    reply = post(app, "/ui/train/config", form(str(data / "ok.jsonl"), model=str(tiny_dir), name=name))
    assert reply.status == 400 and reply.json()["error"]["param"] == "name"


def refused(reply) -> bool:
    return reply.status == 403 and SECRET not in reply.body.decode() and \
        reply.json()["error"]["code"] == "path_not_allowed"


@pytest.mark.parametrize("where", ["../outside/secret.jsonl", "ABS", "link.jsonl", "linked-folder/secret.jsonl",
                                   "/etc/passwd", "~/.bashrc"])
def test_files_outside_the_workdir_and_data_dirs_are_refused(site, tiny_dir, where):
    app, work, data, outside = site
    path = str(outside / "secret.jsonl") if where == "ABS" else where
    cands = path.replace("secret", "cands")
    assert refused(post(app, "/ui/train/preview", {"data": path}))
    assert refused(post(app, "/ui/train/config", form(path, model=str(tiny_dir))))
    assert refused(post(app, "/ui/train/start", form(path, model=str(tiny_dir))))
    assert refused(post(app, "/ui/annotate/next", {"task": cands, "annotator": "a"}))
    assert refused(post(app, "/ui/annotate/export", {"task": cands}))
    assert refused(post(app, "/ui/annotate/generate", {"prompts": path, "models": [str(tiny_dir)], "k": 2}))
    assert app.state.ui.train_job is None and app.state.ui.gen_job is None and not app.state.models.engines


def test_files_inside_the_data_dirs_and_workdir_are_served(site):
    app, work, data, _ = site
    ok = post(app, "/ui/train/preview", {"data": "ok.jsonl", "page": 0, "size": 2})
    assert ok.status == 200 and ok.json()["total"] == 3
    work.mkdir(exist_ok=True)
    (work / "cands.jsonl").write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n")
    reply = post(app, "/ui/annotate/next", {"task": str(work / "cands.jsonl"), "annotator": "a"})
    assert reply.status == 200 and reply.json()["item"]["prompt"] == "p"


@pytest.mark.parametrize("body", [{"data": 5}, {"data": "ok.jsonl", "page": "x"}, {"data": "ok.jsonl", "size": -1},
                                  {"data": "ok.jsonl", "page": 1e400}, {}])
def test_bad_preview_fields_are_400(site, body):
    app, *_ = site
    assert post(app, "/ui/train/preview", body).status == 400


def test_models_outside_the_allowlist_are_refused(site, tiny_dir, tmp_path):
    app, work, data, outside = site
    copy = shutil.copytree(tiny_dir, outside / "model")
    (work / "runs").mkdir(parents=True)
    (work / "runs" / "escape").symlink_to(copy)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for model in (str(copy), "someone/some-model", "tiny-random", str(work / "runs" / "escape"), "../outside/model"):
        reply = post(app, "/v1/chat/completions", chat | {"model": model})
        assert reply.status == 403 and reply.json()["error"]["code"] == "model_not_allowed", model
        assert post(app, "/ui/train/config", form("ok.jsonl", model=model)).status == 403
        gen = post(app, "/ui/annotate/generate", {"prompts": "ok.jsonl", "models": [str(tiny_dir), model], "k": 2})
        assert gen.status == 403
        ppo = form("ok.jsonl", model=str(tiny_dir), stage="ppo", overrides=f"reward.model={model}")
        assert post(app, "/ui/train/config", ppo).status == 403
    assert not app.state.models.engines  # nothing was loaded


def test_models_given_and_runs_inside_the_workdir_are_served(site, tiny_dir):
    app, work, *_ = site
    run = shutil.copytree(tiny_dir, work / "runs" / "r1")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    for model in (str(tiny_dir), str(tiny_dir) + "/", str(run)):
        reply = post(app, "/v1/chat/completions", chat | {"model": model})
        assert reply.status == 200, reply.body
    ppo = form("ok.jsonl", model=str(tiny_dir), stage="ppo", overrides=f"reward.model={run}")
    reply = post(app, "/ui/train/config", ppo)
    assert reply.status == 200 and f"model: {run.resolve()}" in reply.json()["yaml"]


@pytest.mark.parametrize("label", [{"status": "ranked", "ranking": ["a", 1]}, {"status": "ranked", "ranking": 3},
                                   {"status": "ranked", "ranking": [1, 2], "edits": {"9": "x"}},
                                   {"status": "ranked", "ranking": [1, 2], "edits": {"x": "y"}},
                                   {"status": "ranked", "ranking": [1, 2], "edits": [1]}, {"status": None}, {}])
def test_malformed_labels_are_400(site, label):
    app, work, *_ = site
    work.mkdir(exist_ok=True)
    (work / "cands.jsonl").write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n")
    task = post(app, "/ui/annotate/next", {"task": str(work / "cands.jsonl"), "annotator": "a"}).json()["task"]
    reply = post(app, "/ui/annotate/label", {"task": task, "item": "0", "annotator": "a"} | label)
    assert reply.status == 400, reply.body
    good = post(app, "/ui/annotate/label", {"task": task, "item": "0", "annotator": "a", "status": "ranked",
                                            "ranking": [2, 1], "edits": {"1": "b!"}})
    assert good.status == 200 and good.json()["label"]["responses"] == ["a", "b!"]


def test_ui_dtype_loads_the_chat_models_in_it(tmp_path, tiny_dir):
    """posttrain ui --dtype, as chat and serve: the models the UI loads take it."""
    import asyncio

    import torch

    from posttrain.cli import build_parser

    assert build_parser().parse_args(["ui", "--dtype", "bfloat16"]).dtype == "bfloat16"
    app = create_ui_app(tmp_path, [str(tiny_dir)], token=TOKEN, device="cpu", dtype="bfloat16")
    engine = asyncio.run(app.state.models.get(str(tiny_dir)))
    try:
        assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    finally:
        app.state.models.close()
