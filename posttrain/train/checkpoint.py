"""Checkpoints for exact resume: trainable weights, optimizer, scheduler, RNG and data position."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from posttrain.errors import PosttrainError

STATE_FILE = "trainer_state.json"


def trainable_state(model, params: list | None = None) -> dict[str, torch.Tensor]:
    """Trainable weights by name; `params` (the optimizer's set) also covers blocks frozen just now (LISA)."""
    owned = {id(p) for p in params} if params is not None else None
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if (p.requires_grad if owned is None else id(p) in owned)}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, *, model, optimizer, scheduler, position: dict, keep_last: int,
                    params: list | None = None) -> Path:
    """Write checkpoints/step-N atomically (temp folder, then rename) and delete the oldest beyond keep_last."""
    final = folder / f"step-{position['global_step']}"
    tmp = folder / f".tmp-step-{position['global_step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model, params), tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / "optim_rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(position, indent=2))
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


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore everything saved by save_checkpoint; returns the data position."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise PosttrainError(f"checkpoint {path} does not match this model (e.g. {missing[0]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    state = torch.load(path / "optim_rng.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return json.loads((path / STATE_FILE).read_text())
