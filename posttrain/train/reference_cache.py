"""Precomputed DPO reference log-probs, cached on disk so a second run loads them instead of recomputing.

The key covers everything that shapes the numbers: the tokenized samples themselves (token ids
and loss weights, so data files, template, system prompt, max_length and variables all count),
the reference model's identity (its resolved source and the names, sizes and mtimes of its files,
as `datasets` fingerprints local files), dtype, attention implementation, row layout (packed or
padded rows round differently), device type, library versions and the code that computes log-probs.
Files: $POSTTRAIN_CACHE/ref_logps/<key>.pt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import try_to_load_from_cache

from posttrain.data.preference import PrefSample
from posttrain.models.sources import resolve_model, cache_dir

# files whose edits may change log-probs
_CODE = ("train/dpo.py", "models/forward.py", "models/head_logps.py", "models/methods.py",
         "models/fast_lora.py", "models/packed_attention.py")


def data_fingerprint(samples: list[PrefSample]) -> str:
    """sha256 of every sample's token ids and loss weights, in order."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(np.int64(len(s.input_ids)).tobytes())  # lengths first: boundaries are part of the key
        for ids, weights in zip(s.input_ids, s.weights):
            digest.update(np.int64(len(ids)).tobytes())
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            digest.update(np.asarray(weights, dtype=np.float32).tobytes())
    return digest.hexdigest()


def model_fingerprint(model_cfg) -> dict:
    """Where the reference weights come from: resolved source, revision, and its files' stats."""
    source = resolve_model(model_cfg.name_or_path)
    folder = Path(source)
    if not folder.is_dir():  # a hub id: its cached snapshot folder names the commit

        found = try_to_load_from_cache(source, "config.json", revision=model_cfg.revision)
        folder = Path(found).parent if isinstance(found, str) else folder
    files = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file():
                stat = path.stat()  # follows the hub cache's symlinks to the blobs
                files[path.name] = [stat.st_size, stat.st_mtime_ns]
    return {"source": str(folder.resolve()) if folder.is_dir() else source, "revision": model_cfg.revision,
            "files": files}


def cache_file(samples: list[PrefSample], model, model_cfg, device, packed: bool = False) -> Path:
    """The cache path for these samples' reference log-probs under this model, these settings and row layout."""
    root = Path(__file__).resolve().parents[1]
    key = {
        "data": data_fingerprint(samples), "model": model_fingerprint(model_cfg),
        "dtype": str(next(model.parameters()).dtype), "device": torch.device(device).type,
        "attn": getattr(model.config, "_attn_implementation", None), "packed": packed,
        "versions": [torch.__version__, importlib.metadata.version("transformers")],
        "code": hashlib.sha256(b"".join((root / f).read_bytes() for f in _CODE)).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / "ref_logps" / f"{digest}.pt"


def load_reference(path: Path, samples: list[PrefSample]) -> bool:
    """Fill each sample's ref_logps from `path`; False (nothing changed) when it is missing or does not fit."""
    if not path.is_file():
        return False
    try:
        stored = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return False  # a damaged file is recomputed and overwritten
    counts = [len(s.input_ids) for s in samples]
    if stored["counts"].tolist() != counts:
        return False
    logps, pos = stored["logps"].tolist(), 0
    for s in samples:
        s.ref_logps = logps[pos:pos + len(s.input_ids)]
        pos += len(s.input_ids)
    return True


def save_reference(path: Path, samples: list[PrefSample]) -> None:
    """Write the samples' ref_logps atomically (a half-written file is never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"logps": torch.tensor([x for s in samples for x in s.ref_logps], dtype=torch.float64),
               "counts": torch.tensor([len(s.input_ids) for s in samples])}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
