"""Load a base model and its tokenizer: device and dtype choice, and a hub check that fails fast.

Without a network, transformers retries DNS for ~47 s before failing on a hub id; here an
uncached hub id on an offline machine is a one-line `ModelSourceError` within ~3 s, and a
cached one loads with `local_files_only`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, try_to_load_from_cache
from tokenizers import Tokenizer

from posttrain.errors import ConfigError, ModelSourceError
from posttrain.models.sources import BUILTINS, resolve_model
from posttrain.models.vision import is_vlm_folder

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRUE = {"1", "on", "yes", "true"}
HUB_PROBE_TIMEOUT_S = 3.0


def pick_device(pref: str = "auto") -> torch.device:
    """auto = cuda when available, else cpu; an explicit cuda on a machine without one is an error."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {pref!r} requested, but torch sees no CUDA GPU here; use cpu or auto")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls in hardware (AVX512_BF16 or AMX): there bf16 weights decode 1.5-1.7x
    faster than float32 at 8-32 rows (benchmarks/README.md, Generation); without (e.g. Zen3) bf16 matmuls are
    13-20x slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_dtype(pref: str, device: torch.device | str) -> torch.dtype:
    """auto = float32 on CPU (exact, and bf16 is not faster on every CPU), bfloat16 on CUDA if supported."""
    device = torch.device(device)
    if pref == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if pref not in _DTYPES:
        raise ConfigError(f"model.dtype {pref!r} is not one of auto, {', '.join(_DTYPES)}")
    if device.type == "cpu" and (pref == "float16" or pref == "bfloat16" and not cpu_has_fast_bf16()):
        log.warning("model.dtype=%s on a CPU without hardware %s matmuls: expect it to be far slower than float32",
                    pref, pref)
    return _DTYPES[pref]


def load_tokenizer(path_or_id: str, revision: str = "main", trust_remote_code: bool = False):
    """AutoTokenizer with a pad token (eos when the model has none) and right padding."""
    from transformers import AutoTokenizer  # heavy: transformers, ~3 s

    local_only = _hub_local_only(path_or_id, revision, "tokenizer_config.json")
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    if not Path(path_or_id).is_dir():
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error("a tokenizer", path_or_id, err) from None
    tokenizer = _keep_custom_pretokenizer(tokenizer, path_or_id)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelSourceError(f"tokenizer of {path_or_id} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # training collates right-padded; generation code sets left itself
    return tokenizer


def _keep_custom_pretokenizer(tokenizer, path_or_id: str):
    """Fall back to the folder's own tokenizer.json when AutoTokenizer's class re-tokenizes differently.

    transformers 5 picks the class from the model type (qwen2 -> Qwen2Tokenizer), which can replace a
    custom pre-tokenizer so ids silently differ from tokenizer.json.
    """
    tok_file = Path(path_or_id) / "tokenizer.json"
    if not tok_file.is_file():
        return tokenizer
    from transformers import PreTrainedTokenizerFast  # heavy: transformers, ~3 s

    probe = "Hello world, 你好！ It's 2024:\n  code_x = f(y)  # ok"
    reference = Tokenizer.from_file(str(tok_file)).encode(probe, add_special_tokens=False).ids
    if tokenizer.encode(probe, add_special_tokens=False) == reference:
        return tokenizer
    log.warning("%s: %s changes token ids; using tokenizer.json as is", path_or_id, type(tokenizer).__name__)
    return PreTrainedTokenizerFast.from_pretrained(path_or_id)


def load_base(model_cfg, device: torch.device | str | None = None, quantization_config=None):
    """(model, tokenizer) for a ModelConfig: resolved source, chosen dtype, on `device` (default: auto).

    `quantization_config` (e.g. bitsandbytes 4-bit for QLoRA) loads the weights quantised, straight
    onto `device` (a quantised model cannot be moved afterwards).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText  # heavy: transformers, ~3 s

    path = resolve_model(model_cfg.name_or_path)
    auto_class = AutoModelForImageTextToText if is_vlm_folder(path) else AutoModelForCausalLM
    device = pick_device() if device is None else torch.device(device)
    dtype = pick_dtype(model_cfg.dtype, device)
    kwargs = {
        "dtype": dtype,
        "attn_implementation": model_cfg.attn_implementation,
        "trust_remote_code": model_cfg.trust_remote_code,
        "local_files_only": _hub_local_only(path, model_cfg.revision, "config.json"),
    }
    if not Path(path).is_dir():
        kwargs["revision"] = model_cfg.revision
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=str(device))
    log.info("loading %s (%s, %s%s)", path, dtype, device, ", 4-bit" if quantization_config is not None else "")
    try:
        model = auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error("a model", path, err) from None
    tokenizer = load_tokenizer(path, model_cfg.revision, model_cfg.trust_remote_code)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id  # silences a warning per generate()
    if quantization_config is None:
        return model.to(device), tokenizer
    one_4bit_kernel(model)
    return model, tokenizer


def _load_error(what: str, path: str, err: Exception) -> ModelSourceError:
    """One line for a failed from_pretrained; a folder that needs its own Python code says how to allow it."""
    text = str(err)
    if "trust_remote_code" in text or "custom code" in text:
        return ModelSourceError(
            f"{path} needs its own Python code to load (config.json / tokenizer_config.json auto_map); posttrain "
            "runs a folder's code only when you ask: --trust-remote-code, or model.trust_remote_code=true in your "
            "training config, and only for folders you trust")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return ModelSourceError(f"could not load {what} from {path}: {first}")


def one_4bit_kernel(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights for a bf16 kernel on the first
    eval-mode forward: bf16 block scales (the stored base is rounded; saving re-quantises it) and logits that
    differ from the fp32 training path (max gap 0.99 on a 64-token SmolLM2 input), so PPO ratios, DPO
    reference log-probs and eval losses would mix the two. With float32 compute, every forward takes the
    training path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and getattr(module, "compute_dtype", None) == torch.float32:
            module.support_avx512bf16_for_cpu = False


# ---------------------------------------------------------------- reward models

# config.json key of a reward model's stored offset (InstructGPT's bias step, `rm.normalize_data`):
# the reward is the raw score minus this. Plain transformers returns the raw score.
REWARD_OFFSET = "reward_offset"
REWARD_OFFSET_FILE = "reward_offset.json"  # where a virtual-token (adapter-only) reward model keeps it


def load_reward_model(model_cfg, device: torch.device | str, tokenizer=None, quantization_config=None):
    """(seq-classification model with one label, tokenizer) from any causal LM, a saved reward model, or a
    saved virtual-token reward adapter; `quantization_config` loads the base in 4 bits (QLoRA)."""
    from transformers import AutoModelForSequenceClassification  # heavy: transformers, ~3 s

    path = resolve_model(model_cfg.name_or_path)
    tokenizer = tokenizer or load_tokenizer(path, model_cfg.revision, model_cfg.trust_remote_code)
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():  # prompt / prefix reward model: its base, then the adapter and trained head
        from peft import PeftModel  # heavy: peft, ~3 s

        base_name = json.loads(adapter.read_text())["base_model_name_or_path"]
        base, _ = load_reward_model(dataclasses.replace(model_cfg, name_or_path=base_name), device, tokenizer)
        offset_file = Path(path) / REWARD_OFFSET_FILE
        if offset_file.is_file():  # an adapter folder has no config.json to hold the offset
            setattr(base.config, REWARD_OFFSET, json.loads(offset_file.read_text())[REWARD_OFFSET])
        return PeftModel.from_pretrained(base, path).to(device), tokenizer
    kwargs = {} if quantization_config is None else {"quantization_config": quantization_config,
                                                     "device_map": str(device)}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=pick_dtype(model_cfg.dtype, device),
            attn_implementation=model_cfg.attn_implementation, trust_remote_code=model_cfg.trust_remote_code,
            local_files_only=_hub_local_only(path, model_cfg.revision, "config.json"), **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error("a reward model", path, err) from None
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last token that is not pad
    if quantization_config is None:
        return model.to(device), tokenizer
    one_4bit_kernel(model)
    return model, tokenizer


def is_reward_model(folder: str | Path) -> bool:
    """True for a saved model folder whose config.json names a one-label sequence-classification head."""
    config = Path(folder).expanduser() / "config.json"
    if not config.is_file():
        return False
    meta = json.loads(config.read_text(encoding="utf-8"))
    archs = meta.get("architectures") or []
    return bool(archs) and all(a.endswith("ForSequenceClassification") for a in archs) and \
        len(meta.get("id2label") or {}) == 1


def reward_offset(model) -> float:
    """The offset a reward model's raw score is shifted by (0.0 when none was stored)."""
    return float(getattr(model.config, REWARD_OFFSET, None) or 0.0)


# ---------------------------------------------------------------- hub access


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _hub_local_only(path_or_id: str, revision: str, probe_file: str) -> bool:
    """For a hub id: True = load from the local HF cache only; raise when neither cache nor hub works."""
    if Path(path_or_id).is_dir():
        return False

    offline = hub_offline()
    if not offline and _hub_reachable():
        return False
    cached = try_to_load_from_cache(path_or_id, probe_file, revision=revision)
    if isinstance(cached, str):
        return True
    why = "HF_HUB_OFFLINE is set" if offline else f"{_hub_host()[0]} cannot be reached"
    raise ModelSourceError(
        f"cannot load hub model {path_or_id!r}: this machine is offline ({why}) and it is not in the "
        f"local Hugging Face cache. Use a local model folder (model.name_or_path=/path/to/folder with "
        f"config.json and weights) or a built-in: {', '.join(BUILTINS)}."
    )


def _hub_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.lru_cache(maxsize=4)
def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub; in a thread because DNS lookups ignore socket timeouts."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(_hub_host(), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)
