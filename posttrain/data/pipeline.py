"""The SFT data pipeline: files -> rows -> Conversations -> token ids + per-token loss weights.

Per dataset: read, cap (max_samples, seeded), hold out eval rows, mix by weight, then one
cached `datasets.map` converts and encodes. Rows with content problems (data/policy.py: a blank
reply, too long, no final reply) leave as a `drop` reason, are counted, and are filtered out, or
stop the run under data.strict; an empty result names those counts.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from posttrain.data.formats import detect_format, rename_columns, row_to_conversation
from posttrain.data.images import kept_images
from posttrain.data.policy import ContentProblem, count_problem, drop_sample
from posttrain.data.reading import read_rows, source_of
from posttrain.data.holdout import held_out
from posttrain.errors import ConfigError, PosttrainError
from posttrain.templates.render import DropSample, apply_template, encode_conversation

ROW_COLUMN = "__posttrain_row"  # the row's index in its file, for error messages after shuffling


@dataclass
class SFTData:
    train: object  # datasets.Dataset: input_ids (list[int]), weights (list[float]), n_loss_tokens (int); images
    eval: object | None  # same columns; None when no eval set was asked for (or nothing survived)
    drops: dict[str, int]  # DropSample reason -> count, across train and eval
    n_rows: int  # rows read from the files (train and eval), before caps and weights


@dataclass
class _Source:
    """One file's rows and which of them go to train (after weighting) and to eval."""

    path: str
    rows: object  # datasets.Dataset with ROW_COLUMN added
    fmt: str
    cfg: object  # DatasetConfig
    train_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    eval_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def build_sft_data(data_cfg, template_cfg, tokenizer, seed: int, images: bool = False) -> SFTData:
    """Read, cap, split, mix and encode `data_cfg.datasets` (and eval sets) for SFT.

    Eval sets take max_samples but not weight (mixing is about training). Template and
    variables change the cache fingerprint, so edited settings re-encode; unchanged ones reuse it.
    images: the model takes images (each sample's `images` column lists the ones its tokens hold).
    """
    apply_template(tokenizer, template_cfg.name)
    train = [_read(ds_cfg, seed, (0, i)) for i, ds_cfg in enumerate(data_cfg.datasets)]
    evals = [_read(ds_cfg, seed, (1, i)) for i, ds_cfg in enumerate(data_cfg.eval_datasets)]
    n_rows = sum(len(s.rows) for s in train + evals)
    for src in evals:
        src.eval_idx, src.train_idx = src.train_idx, src.train_idx[:0]
    if not evals and data_cfg.val_size > 0:
        _hold_out(train, data_cfg.val_size, seed)
    for i, src in enumerate(train):
        src.train_idx = _mix(src.train_idx, src.cfg.weight, np.random.default_rng([seed, 2, i]))

    encoder_args = {"tokenizer": tokenizer, "mask": data_cfg.mask, "max_length": data_cfg.max_length,
                    "variables": data_cfg.variables, "system": template_cfg.system, "strict": data_cfg.strict,
                    "images": images}
    train_ds, train_drops = _encode_all(train, "train_idx", encoder_args)
    eval_ds, eval_drops = _encode_all(train + evals, "eval_idx", encoder_args)
    drops = dict(train_drops + eval_drops)
    if len(train_ds) == 0:
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(drops.items())) or "no rows selected"
        raise PosttrainError(
            f"no training samples left ({n_rows} rows read; dropped {counts}); check data.max_length, "
            "data.mask and the datasets' weight/max_samples")
    wants_eval = bool(evals) or data_cfg.val_size > 0
    return SFTData(train=train_ds, eval=eval_ds if wants_eval and len(eval_ds) else None,
                   drops=drops, n_rows=n_rows)


def _read(ds_cfg, seed: int, salt: tuple[int, int]) -> _Source:
    """Read one file and pick its rows: all, or `max_samples` of them after a seeded shuffle."""
    rows = read_rows(ds_cfg.path)
    fmt = ds_cfg.format
    if fmt == "auto":  # before ROW_COLUMN exists: messages name the file's own columns only
        fmt = detect_format(rename_columns(dict.fromkeys(rows.column_names), ds_cfg.columns), str(ds_cfg.path))
    rows = rows.add_column(ROW_COLUMN, np.arange(len(rows), dtype=np.int64))
    idx = np.arange(len(rows), dtype=np.int64)
    if ds_cfg.max_samples is not None and ds_cfg.max_samples < len(rows):
        if ds_cfg.max_samples < 0:
            raise ConfigError(f"{ds_cfg.path}: max_samples must be >= 0, got {ds_cfg.max_samples}")
        # sorted back into file order: contiguous reads, and errors surface in line order
        idx = np.sort(np.random.default_rng([seed, *salt]).permutation(len(rows))[: ds_cfg.max_samples])
    return _Source(path=str(ds_cfg.path), rows=rows, fmt=fmt, cfg=ds_cfg, train_idx=idx)


def _hold_out(sources: list[_Source], val_size: float, seed: int) -> None:
    """Move val_size (<1: a fraction, >=1: a count) of all picked rows to eval, seeded (data/holdout.py).

    Done before weighting, so a repeated row (weight > 1) can never sit in both splits.
    """
    held = held_out(sum(len(s.train_idx) for s in sources), val_size, seed)
    start = 0
    for src in sources:
        mask = held[start: start + len(src.train_idx)]
        src.train_idx, src.eval_idx = src.train_idx[~mask], src.train_idx[mask]
        start += len(mask)


def _mix(idx: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
    """round(weight * rows) rows: whole copies for the integer part, a seeded subsample for the rest."""
    if weight < 0:
        raise ConfigError(f"dataset weight must be >= 0, got {weight}")
    if len(idx) == 0:
        return idx
    copies, rest = divmod(round(weight * len(idx)), len(idx))
    return np.concatenate([np.tile(idx, copies), np.sort(rng.choice(idx, rest, replace=False))])


def _encode_all(sources: list[_Source], which: str, encoder_args: dict):
    """Encode the `which` rows of every source; return (kept samples, Counter of drop reasons).

    Each distinct row is encoded once; weighting then repeats its samples, so drops count rows
    of the files, not copies, and weight 3 costs no extra tokenization.
    """
    import datasets  # heavy: datasets (~3 s), loaded only when data is encoded

    parts, drops = [], Counter()
    for src in sources:
        idx = getattr(src, which)
        if len(idx) == 0:
            continue
        encoder = _Encoder(path=src.path, fmt=src.fmt, columns=src.cfg.columns, role_tags=src.cfg.role_tags,
                           code=_code_version(), **encoder_args)
        encoded = src.rows.select(np.unique(idx)).map(
            encoder, batched=True, batch_size=256, remove_columns=src.rows.column_names,
            features=_encoded_features(), desc=f"encoding {Path(src.path).name}")
        reasons = encoded["drop"]
        drops.update(r for r in reasons if r)
        copies = np.bincount(idx, minlength=len(src.rows))[np.asarray(encoded[ROW_COLUMN], dtype=np.int64)]
        copies[[i for i, r in enumerate(reasons) if r]] = 0
        parts.append(encoded.select(np.repeat(np.arange(len(encoded)), copies)))
    if not parts:
        features = _encoded_features()
        parts = [datasets.Dataset.from_dict({k: [] for k in features}, features=features)]
    internal = ["drop", ROW_COLUMN] + ([] if encoder_args.get("images") else ["images"])  # text data: no images column
    return datasets.concatenate_datasets(parts).remove_columns(internal), drops


def _encoded_features():
    """Explicit types: a batch of only drops would otherwise infer list<null> and break concatenation."""
    import datasets  # heavy: datasets (~3 s), loaded only when data is encoded

    return datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")),
        "weights": datasets.List(datasets.Value("float32")),
        "n_loss_tokens": datasets.Value("int32"),
        "images": datasets.List(datasets.Value("string")),  # resolved paths / data URLs, in token order
        "drop": datasets.Value("string"),  # "" for a kept sample, else the DropSample reason
        ROW_COLUMN: datasets.Value("int64"),  # the file row a sample came from, to apply weights
    })


def _code_version() -> str:
    """A hash of the code that shapes a sample, part of the map's cache fingerprint.

    datasets hashes our functions by reference (module + name), so without this an edit to a
    template or format parser would silently reuse stale cached token ids.
    """
    root = Path(__file__).resolve().parents[1]
    files = [root / "data" / name for name in ("formats.py", "pipeline.py", "policy.py", "images.py")]
    files += sorted((root / "templates").glob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class _Encoder:
    """The batched map function: raw rows -> one output row per encoded sample (or per drop).

    A picklable object rather than a closure, so datasets fingerprints its fields (tokenizer,
    settings, code version) and reuses the cache only when all of them match. It holds only
    what shapes a sample: a new weight reuses the encoded rows.
    """

    tokenizer: object
    mask: str
    max_length: int | None
    variables: dict[str, str]
    system: str | None
    strict: bool  # content problems raise instead of leaving as a drop reason
    path: str
    fmt: str
    columns: dict[str, str]
    role_tags: dict[str, str]
    code: str
    images: bool = False  # the model takes images: rows may hold them (data/images.py)

    def __call__(self, batch: dict) -> dict:
        out = {name: [] for name in _encoded_features()}
        names = [k for k in batch if k != ROW_COLUMN]
        for j, row_index in enumerate(batch[ROW_COLUMN]):
            source, drops = source_of(self.path, row_index), Counter()
            try:
                conv = row_to_conversation({k: batch[k][j] for k in names}, self.fmt, source=source,
                                           columns=self.columns, role_tags=self.role_tags, variables=self.variables,
                                           images=self.images)
                samples = encode_conversation(conv, self.tokenizer, mask=self.mask,
                                              max_length=self.max_length, system=self.system)
                if not samples:
                    drop_sample(drops, DropSample("empty"), source, self.strict)
            except ContentProblem as problem:
                samples = []
                count_problem(drops, problem, self.strict)
            except DropSample as drop:
                samples = []
                drop_sample(drops, drop, source, self.strict)
            reason = next(iter(drops), "")
            if reason:  # one placeholder row carries the reason; it is counted, then filtered out
                _append(out, row_index, [], [], reason)
            for sample in samples:
                _append(out, row_index, sample.input_ids, sample.weights, "",
                        kept_images(conv.images, sample.input_ids, self.tokenizer, Path(self.path).parent))
        return out


def _append(out: dict, row_index: int, input_ids: list[int], weights: list[float], drop: str,
            images: list[str] = ()) -> None:
    out["images"].append(list(images))
    out[ROW_COLUMN].append(row_index)
    out["input_ids"].append(input_ids)
    out["weights"].append(weights)
    out["n_loss_tokens"].append(sum(1 for w in weights if w > 0))
    out["drop"].append(drop)
