"""Saving a trained model into a run folder, and loading any model reference for inference.

A run folder holds `config.yaml` (the resolved run config), the tokenizer files, and either a
PEFT adapter (method lora) or a full HF model folder (full / freeze). Inference commands take a
run folder, a checkpoint inside one, a plain HF model folder, a built-in name or a hub id. Of a
run's config they read only the sections that shape the model and its prompts (`SavedRun`), so
run folders whose config.yaml holds every section (posttrain 0.1) load too.

A loaded folder never decides to run code: its config.yaml's `model.trust_remote_code` is ignored,
and folder code (config.json `auto_map`) runs only when the caller passes `trust_remote_code=True`
from the user's own command line (`--trust-remote-code`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from posttrain.data.config import DataConfig
from posttrain.errors import ConfigError, ModelSourceError
from posttrain.models.anatomy import unwrap
from posttrain.models.config import Methods, ModelConfig
from posttrain.models.vision import add_image_token
from posttrain.models.vision_config import VisionConfig
from posttrain.models.vision_load import attach_image_inputs, load_vision_model
from posttrain.templates.config import TemplateConfig
from posttrain.typed_config import build, read_yaml
from posttrain.models.load import load_base, pick_device, load_tokenizer
from posttrain.models.methods import quantization_config
from posttrain.models.sources import resolve_model

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.yaml"


@dataclass
class SavedRun(Methods):
    """The sections of a run's config.yaml that inference reads: how it was trained (the method sections, as
    `Methods`), the model, how it rendered samples (template, data), plus the device it trained on. Defaults
    stand for a plain model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    device: str = "auto"  # train.device

    @property
    def methods(self) -> Methods:
        return Methods.of(self)


def read_run(path: str | Path) -> SavedRun:
    """A run's config.yaml -> the sections inference reads; the other sections (optim, train, the stage's) are
    not read, so a folder written with more or older sections loads as long as these still parse."""
    tree = read_yaml(path)
    sections = {}
    for name, cls in typing.get_type_hints(SavedRun).items():
        if name in tree and name != "device":
            if not isinstance(tree[name], dict):
                raise ConfigError(f"{path}: section {name} is not a mapping")
            sections[name] = build(cls, tree[name], name + ".")
    train = tree.get("train") if isinstance(tree.get("train"), dict) else {}
    return SavedRun(**sections, device=str(train.get("device", "auto")))


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel  # heavy: peft, ~3 s

    return isinstance(model, PeftModel)


def save_model(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Write a PEFT adapter (LoRA) or a full safetensors model folder, plus the tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Both write safetensors: PEFT by default, transformers 5 always (no pickle option left).
    pissa_init = getattr(model, "posttrain_pissa_init", None)
    if pissa_init is not None:  # PiSSA -> a plain rank-2r LoRA on the original base (PEFT's conversion)
        model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=pissa_init)
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def find_run_config(folder: Path) -> Path | None:
    """The run's config.yaml for a run folder or a checkpoint inside it (run/checkpoints/step-N)."""
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / RUN_CONFIG).is_file():
            return candidate / RUN_CONFIG
    return None


def run_config_of(ref: str | Path, trust_remote_code: bool = False) -> SavedRun | None:
    """The saved run config a model reference was trained with, or None for anything but a run folder.

    Its `model.trust_remote_code` is replaced by the caller's (the user's command line), never taken
    from the folder."""
    folder = Path(ref).expanduser()
    cfg_path = find_run_config(folder) if folder.is_dir() else None
    # A parent's config.yaml only counts when this folder holds weights of its own (a checkpoint).
    has_weights = (folder / ADAPTER_CONFIG).is_file() or _has_full_model(folder)
    if cfg_path is not None and cfg_path.parent != folder and not has_weights:
        cfg_path = None
    if cfg_path is None:
        return None
    cfg = read_run(cfg_path)
    if cfg.model.trust_remote_code and not trust_remote_code:  # a folder handed over must not decide to run code
        log.warning("%s: ignoring model.trust_remote_code=true (a loaded folder cannot switch on remote code; "
                    "pass --trust-remote-code if you trust this folder)", cfg_path)
    cfg.model.trust_remote_code = trust_remote_code
    return cfg


def load_model_for_inference(ref: str | Path, device: str | None = None, dequantize: bool = False,
                             trust_remote_code: bool = False,
                             dtype: str | None = None) -> tuple[nn.Module, object, SavedRun | None]:
    """(model in eval mode, tokenizer, the run's saved config or None) for any model reference.

    `dtype` (model.dtype's values) overrides the run's model.dtype, or auto for a plain folder.

    A QLoRA run loads its base in 4 bits, as trained; `dequantize` turns that base back into plain
    float weights (the NF4-rounded values the adapter was trained against) before the adapter.
    `trust_remote_code` comes from the user's command line only, never from the folder's config.yaml.
    """
    folder = Path(ref).expanduser()
    is_adapter = (folder / ADAPTER_CONFIG).is_file()
    cfg = run_config_of(ref, trust_remote_code)

    chosen = {"dtype": dtype} if dtype is not None else {}
    if is_adapter:
        model = _load_adapter(folder, cfg, device, dequantize, trust_remote_code, chosen)
        tokenizer = _load_tokenizer(folder, cfg, trust_remote_code)
        if cfg is not None and cfg.vision.tower:  # the base was assembled: its tokenizer gained <image> the same way
            add_image_token(tokenizer, unwrap(model))
    elif cfg is not None:
        if not _has_full_model(folder):
            raise ModelSourceError(f"{folder}: a run folder without a model (no {ADAPTER_CONFIG} or config.json)")
        # Keep the run's dtype / attention settings, but read the weights saved in the run.
        model, tokenizer = load_base(dataclasses.replace(cfg.model, name_or_path=str(folder), **chosen), device=device)
    else:
        model, tokenizer = load_base(ModelConfig(name_or_path=str(ref), trust_remote_code=trust_remote_code, **chosen),
                                     device=device)
    model.eval()
    attach_image_inputs(model, tokenizer, [folder, folder.parent, folder.parent.parent])
    return model, tokenizer, cfg


def model_stamp(ref: str | Path) -> str:
    """What identifies a model reference for result caches: a local folder's absolute path and the
    size and mtime of its weight files (retraining in place changes them); otherwise the name itself."""
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        return str(ref)
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    return f"{folder.resolve()}#{hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]}"


def _has_full_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _load_adapter(folder: Path, cfg: SavedRun | None, device: str | None, dequantize: bool = False,
                  trust_remote_code: bool = False, chosen: dict | None = None) -> nn.Module:
    """Base model (from the run config, else the adapter's own record) + the saved adapter."""
    from peft import PeftModel  # heavy: peft, ~3 s

    if cfg is not None:
        base_cfg = cfg.model
    else:
        adapter = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base_name = adapter.get("base_model_name_or_path")
        if not base_name:
            raise ModelSourceError(f"{folder}: adapter without a base model name and no {RUN_CONFIG} to say it")
        base_cfg = ModelConfig(name_or_path=base_name, trust_remote_code=trust_remote_code)
    base_cfg = dataclasses.replace(base_cfg, **(chosen or {}))
    quant = quantization_config(cfg.methods, pick_device(device or "auto")) if cfg is not None else None
    if cfg is not None and cfg.vision.tower:  # a LLaVA assembled in training: assembled again, the same way
        base, _, _ = load_vision_model(base_cfg, cfg.vision, device or pick_device())
    else:
        base, _ = load_base(base_cfg, device=device, quantization_config=quant)
    if quant is not None and dequantize:
        base = base.dequantize()
    model = PeftModel.from_pretrained(base, str(folder))
    return model.to(next(base.parameters()).device)


def _load_tokenizer(folder: Path, cfg: SavedRun | None, trust_remote_code: bool = False):
    """The tokenizer saved beside the weights (it carries the trained chat template)."""
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "tokenizer_config.json").is_file():
            return load_tokenizer(str(candidate), trust_remote_code=trust_remote_code)
    if cfg is None:
        raise ModelSourceError(f"{folder}: no tokenizer files here or in the run folder")

    return load_tokenizer(resolve_model(cfg.model.name_or_path), trust_remote_code=trust_remote_code)
