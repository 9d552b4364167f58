"""Checkpoints for exact resume: trainable weights, optimizer, scheduler, RNG and data position.

The pieces every engine composes (train/engines/base.py): a temp folder renamed when complete,
`trainable.safetensors` for whole-weight engines (sharded ones write their own layout beside it),
`optim_rng.pt` and `trainer_state.json`.

Nothing in a checkpoint is unpickled: weights are safetensors, the position is JSON, and optim_rng.pt
holds only tensors, numbers, strings and containers (the RNG states converted to those), so it loads
with `torch.load(weights_only=True)`. A file that needs more (a planted payload, an older pickled
format) is refused with an error naming it.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from posttrain.errors import PosttrainError

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optim_rng.pt"


def trainable_state(model, params: list | None = None) -> dict[str, torch.Tensor]:
    """Trainable weights by name; `params` (the optimizer's set) also covers blocks frozen just now (LISA)."""
    owned = {id(p) for p in params} if params is not None else None
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if (p.requires_grad if owned is None else id(p) in owned)}


def rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers (what weights_only=True loads)."""
    version, words, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging(folder: Path, step: int) -> Path:
    """The temp folder checkpoint step-N is written to before it is renamed (every process names the same)."""
    return Path(folder) / f".tmp-step-{step}"


def clear(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def save_trainable(tmp: Path, model, params: list | None = None) -> None:
    save_file(trainable_state(model, params), tmp / "trainable.safetensors")


def write_state(tmp: Path, state: dict, position: dict) -> None:
    """optim_rng.pt (tensors, numbers, strings and containers only) and the JSON data position."""
    torch.save(state, tmp / OPTIM_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(position, indent=2))


def commit(folder: Path, tmp: Path, step: int, keep_last: int) -> Path:
    """Rename the complete temp folder to step-N and delete the oldest checkpoints beyond keep_last."""
    final = Path(folder) / f"step-{step}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    found = [p for p in Path(folder).glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume(resume: str | None, folder: Path) -> Path | None:
    """'auto' -> latest checkpoint in folder (None if there is none); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise PosttrainError(f"train.resume: {path} is not a checkpoint folder (no {STATE_FILE})")
    return path


def read_state(path: Path) -> tuple[dict, dict]:
    """(optim_rng.pt through the weights-only unpickler, the data position) of a checkpoint folder."""
    return _load_optim_state(Path(path) / OPTIM_FILE), json.loads((Path(path) / STATE_FILE).read_text())


def load_trainable(path: Path, model) -> None:
    """Copy trainable.safetensors into the model's parameters of the same names."""
    weights = load_file(Path(path) / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise PosttrainError(f"checkpoint {path} does not match this model (e.g. {missing[0]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def _load_optim_state(file: Path) -> dict:
    """optim_rng.pt through the weights-only unpickler: tensors and plain data load, code never runs."""
    try:
        return torch.load(file, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        # torch's own text advises weights_only=False; name only what the file asked to import
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        why = f"it needs {needs.group(1)}, not plain tensors and numbers" if needs else "not a checkpoint file"
        raise PosttrainError(
            f"{file}: cannot be loaded safely: {why}. Checkpoints load with weights_only=True, so one written by "
            "an older posttrain (pickled RNG state) or a planted payload is refused; resume from a checkpoint this "
            "version wrote, or start without train.resume") from None
