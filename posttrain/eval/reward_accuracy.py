"""`posttrain score`: a saved reward model's pairwise accuracy and margins on a preference file, and
`--normalize`, which stores the reward offset (models/reward_head.py) that makes a file's reference
responses score 0 on average.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from posttrain.data.config import DatasetConfig
from posttrain.data.preference import encode_all, read_preferences
from posttrain.data.references import reference_ids
from posttrain.errors import ModelSourceError
from posttrain.models.config import ModelConfig
from posttrain.models.load import REWARD_OFFSET, is_reward_model, load_reward_model, pick_device, reward_offset
from posttrain.models.reward_head import fit_offset, raw_rewards
from posttrain.models.run import SavedRun, find_run_config, read_run
from posttrain.templates.render import apply_template

log = logging.getLogger("posttrain")


def check_reward_folder(run_dir: str) -> None:
    """A local folder must hold a reward model: config + weights of a one-label sequence classifier, or a
    reward-model (SEQ_CLS) adapter; otherwise one line says what is missing. Names and hub ids pass."""
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        return
    expected = "expected a reward-model run or an HF sequence-classification folder"
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        task = json.loads(adapter.read_text(encoding="utf-8")).get("task_type")
        if task != "SEQ_CLS":
            raise ModelSourceError(f"{folder} holds a {task or 'PEFT'} adapter, not a reward model; {expected}")
        return
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
    if not (folder / "config.json").is_file() or not weights:
        raise ModelSourceError(f"no model weights / config in {folder}; {expected}")
    if not is_reward_model(folder):
        raise ModelSourceError(f"{folder} holds a model without a one-label sequence-classification head "
                               f"(config.json architectures / id2label); {expected}")


def _load_for_scoring(run_dir: str, device: str | None):
    """(model, tokenizer, the run's saved config or defaults, device), rendering set up as the run trained."""
    check_reward_folder(run_dir)
    cfg_path = find_run_config(Path(run_dir)) if Path(run_dir).is_dir() else None
    cfg = read_run(cfg_path) if cfg_path is not None else SavedRun()
    dev = pick_device(device or cfg.device)
    model_cfg = ModelConfig(name_or_path=str(run_dir), dtype=cfg.model.dtype,
                            attn_implementation=cfg.model.attn_implementation)
    model, tokenizer = load_reward_model(model_cfg, dev)
    model.eval()
    apply_template(tokenizer, cfg.template.name)
    return model, tokenizer, cfg, dev


def normalize_rewards(run_dir: str, ref_path: str, batch_size: int = 8, device: str | None = None,
                      strict: bool = False) -> dict:
    """`posttrain score --normalize`: write the offset that makes `ref_path`'s reference responses average 0."""
    check_reward_folder(run_dir)
    config_file = Path(run_dir) / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{run_dir}: no config.json to store the reward offset in")
    model, tokenizer, cfg, dev = _load_for_scoring(run_dir, device)
    drops: Counter = Counter()
    ids = reference_ids(ref_path, tokenizer, cfg.data, cfg.template.system, drops, strict)
    offset = fit_offset(model, ids, tokenizer.pad_token_id, batch_size, dev)
    meta = json.loads(config_file.read_text(encoding="utf-8"))
    meta[REWARD_OFFSET] = offset  # only this key changes
    config_file.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("%s: reward_offset %.6f (mean raw reward of %d reference responses in %s)", config_file, offset,
             len(ids), ref_path)
    return {"reward_offset": offset, "reference_responses": len(ids), "dropped": dict(drops)}


@torch.no_grad()
def score_preferences(run_dir: str, data_path: str, batch_size: int = 8, device: str | None = None,
                      strict: bool = False) -> dict:
    """Score every response of a preference file with a saved reward model; pairwise accuracy etc.

    Rendering (template, system, max_length) follows the run's config.yaml when there is one;
    rewards are the raw scores minus the model's stored offset. Rows with content problems are
    dropped and counted (`dropped`), or fatal with `strict`.
    """
    model, tokenizer, cfg, dev = _load_for_scoring(run_dir, device)
    drops: Counter = Counter()
    recs = read_preferences(DatasetConfig(path=data_path), cfg.data.variables, drops, strict)
    samples = encode_all(recs, tokenizer, cfg.data.max_length, cfg.template.system, drops, strict)
    offset = reward_offset(model)
    flat = raw_rewards(model, [ids for s in samples for ids in s.input_ids], tokenizer.pad_token_id,
                       batch_size, dev) - offset
    rewards = flat.tolist()
    per_sample, pos = [], 0
    for s in samples:
        per_sample.append(rewards[pos:pos + len(s.input_ids)])
        pos += len(s.input_ids)
    gaps = [r[b] - r[w] for s, r in zip(samples, per_sample) for b, w in s.pairs]
    lengths = [[round(sum(w)) for w in s.weights] for s in samples]  # response tokens (mask "last")
    longer = [(n[b] > n[w]) + 0.5 * (n[b] == n[w]) for s, n in zip(samples, lengths) for b, w in s.pairs]
    return {"prompts": len(samples), "pairs": len(gaps), "dropped": dict(drops),
            "accuracy": sum(g > 0 for g in gaps) / max(len(gaps), 1),
            "mean_margin": sum(gaps) / max(len(gaps), 1), "reward_offset": offset,
            "reward_mean": float(flat.mean()) if rewards else 0.0,
            "reward_std": float(flat.std()) if len(rewards) > 1 else 0.0,
            # what "the longer response wins" scores on these pairs, and how far the rewards follow length
            "longer_wins_accuracy": sum(longer) / max(len(longer), 1),
            "length_correlation": length_correlation(rewards, [n for row in lengths for n in row]),
            "scores": [{"source": s.source, "rewards": r, "lengths": n}
                       for s, r, n in zip(samples, per_sample, lengths)]}


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, tie_group = np.unique(x, return_inverse=True)
    return (np.bincount(tie_group, weights=ranks) / np.bincount(tie_group))[tie_group]


def length_correlation(rewards: list[float], lengths: list[int]) -> dict:
    """Pearson and Spearman correlation of reward with response length in tokens, over every scored response;
    None where undefined (fewer than 3 responses, or constant rewards or lengths)."""
    r, n = np.asarray(rewards, dtype=float), np.asarray(lengths, dtype=float)
    out = {"responses": len(r), "pearson": None, "spearman": None}
    if len(r) >= 3 and r.std() > 0 and n.std() > 0:
        out["pearson"] = float(np.corrcoef(r, n)[0, 1])
        out["spearman"] = float(np.corrcoef(_ranks(r), _ranks(n))[0, 1])
    return out
