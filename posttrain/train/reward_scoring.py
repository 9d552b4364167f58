"""Scoring with a saved reward model: `posttrain score` (pairwise accuracy, margins) and the reward offset.

The offset is InstructGPT's bias step (Ouyang et al. 2022, sec. 3.5): shift the rewards so that a
reference set (the demonstrations) scores 0 on average. transformers' `*ForSequenceClassification`
head has no bias, and a Llama-style final RMSNorm leaves no constant feature to fold one into, so
the offset is stored in the model's config.json as `reward_offset`. `posttrain score`, the PPO
reward-model source and `posttrain serve` subtract it; plain transformers returns the raw score.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch

from posttrain.errors import ModelSourceError, PosttrainError
from posttrain.models.load import REWARD_OFFSET, is_reward_model, reward_offset

log = logging.getLogger("posttrain")


@torch.no_grad()
def raw_rewards(model, ids: list[list[int]], pad_id: int, batch_size: int, device) -> torch.Tensor:
    """(N,) raw score of each token-id row (no offset), right-padded in batches of `batch_size`."""
    from posttrain.data.collate import collate
    from posttrain.train.reward import sequence_rewards

    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start:start + batch_size]
        batch = collate([[k] for k in range(len(rows))], rows, [[0.0] * len(r) for r in rows], pad_id)
        out.append(sequence_rewards(model, {"input_ids": batch["input_ids"].to(device)}).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def reference_ids(path: str, tokenizer, cfg, drops: Counter, strict: bool = False) -> list[list[int]]:
    """Token ids of a file's reference responses, rendered as the run renders them.

    A preference file gives each prompt's chosen (top-ranked) responses; a conversation file
    (alpaca, sharegpt, openai) gives each conversation ending in an assistant reply. Rows with
    content problems are counted in `drops`, or fatal with `strict` (data/policy.py).
    """
    from posttrain.config import DatasetConfig
    from posttrain.data.formats import detect_format, row_to_conversation
    from posttrain.data.policy import ContentProblem, count_problem, drop_or_raise, drop_sample
    from posttrain.data.preference import encode_all, read_preferences
    from posttrain.data.reading import read_rows, source_of
    from posttrain.templates.render import DropSample, encode_conversation

    rows = read_rows(path)
    length, system = cfg.data.max_length, cfg.template.system
    if {"chosen", "responses"} & set(rows.column_names):
        samples = encode_all(read_preferences(DatasetConfig(path=str(path)), cfg.data.variables, drops, strict),
                             tokenizer, length, system, drops, strict)
        out = [ids for s in samples for k, ids in enumerate(s.input_ids) if k not in {w for _, w in s.pairs}]
    else:
        fmt, out = detect_format(rows.column_names, str(path)), []
        for i, row in enumerate(rows):
            source = source_of(path, i)
            try:
                conv = row_to_conversation(row, fmt, source=source, variables=cfg.data.variables)
                if not conv.messages or conv.messages[-1].role != "assistant":
                    drop_or_raise(drops, "no_final_reply", source, strict)
                    continue
                out.append(encode_conversation(conv, tokenizer, mask="last", max_length=length, system=system)[0]
                           .input_ids)
            except ContentProblem as problem:
                count_problem(drops, problem, strict)
            except DropSample as drop:
                drop_sample(drops, drop, source, strict)
    if not out:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(drops.items())) or "none"
        raise PosttrainError(f"{path}: no reference responses to normalise rewards on (dropped {counts})")
    return out


def fit_offset(model, ids: list[list[int]], pad_id: int, batch_size: int, device) -> float:
    """Store the mean raw reward of `ids` as the model's offset: those responses now average 0."""
    offset = float(raw_rewards(model, ids, pad_id, batch_size, device).double().mean())
    model.config.reward_offset = offset
    return offset


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
    """(model, tokenizer, the run's config or defaults, device), rendering set up as the run trained."""
    from posttrain.config import ModelConfig, RunConfig, load_config
    from posttrain.models.load import load_reward_model, pick_device
    from posttrain.models.run import find_run_config
    from posttrain.templates.render import apply_template

    check_reward_folder(run_dir)
    cfg_path = find_run_config(Path(run_dir)) if Path(run_dir).is_dir() else None
    cfg = load_config(cfg_path) if cfg_path is not None else RunConfig()
    dev = pick_device(device or cfg.train.device)
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
    ids = reference_ids(ref_path, tokenizer, cfg, drops, strict)
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
    from posttrain.config import DatasetConfig
    from posttrain.data.preference import encode_all, read_preferences

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
    return {"prompts": len(samples), "pairs": len(gaps), "dropped": dict(drops),
            "accuracy": sum(g > 0 for g in gaps) / max(len(gaps), 1),
            "mean_margin": sum(gaps) / max(len(gaps), 1), "reward_offset": offset,
            "reward_mean": float(flat.mean()) if rewards else 0.0,
            "reward_std": float(flat.std()) if len(rewards) > 1 else 0.0,
            "scores": [{"source": s.source, "rewards": r} for s, r in zip(samples, per_sample)]}
