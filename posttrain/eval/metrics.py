"""Reference metrics for generated text: corpus BLEU-4 and ROUGE-1/2/L (F1), in plain Python.

Tokenization decides these numbers, so it is explicit: English (and any non-CJK text) splits
into lower-cased words and punctuation; CJK text goes to jieba when installed, else to single
characters (the usual fallback, and what `segment="char"` forces).
"""

from __future__ import annotations

import math
import re
from collections import Counter

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]|\w+|[^\w\s]", re.UNICODE)


def tokenize(text: str, segment: str = "auto") -> list[str]:
    """Words for metric counting. segment: auto (jieba for CJK if installed), char, or jieba."""
    text = text.lower().strip()
    if segment == "jieba" or (segment == "auto" and _CJK.search(text) and _has_jieba()):
        import jieba

        return [t for t in (w.strip() for w in jieba.lcut(text)) if t]
    return _WORD.findall(text)  # CJK characters one by one, other scripts by word


def _has_jieba() -> bool:
    try:
        import jieba  # noqa: F401
    except ImportError:
        return False
    return True


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: list[list[str]], references: list[list[str]], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002, eq. 1-2): geometric mean of clipped n-gram precisions
    summed over the corpus, times the brevity penalty; one reference per hypothesis, 0-100."""
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp_len += len(hyp)
        ref_len += len(ref)
        for n in range(1, max_n + 1):
            h, r = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if min(matches) == 0 or hyp_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


def _f1(overlap: int, hyp_total: int, ref_total: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / hyp_total, overlap / ref_total
    return 2 * p * r / (p + r)


def rouge_n(hyp: list[str], ref: list[str], n: int) -> float:
    """ROUGE-N F1 (Lin 2004): clipped n-gram overlap over hypothesis / reference n-gram counts."""
    h, r = _ngrams(hyp, n), _ngrams(ref, n)
    overlap = sum(min(c, r[g]) for g, c in h.items())
    return _f1(overlap, sum(h.values()), sum(r.values()))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: list[str], ref: list[str]) -> float:
    """ROUGE-L F1: longest common subsequence over hypothesis and reference lengths."""
    return _f1(_lcs(hyp, ref), len(hyp), len(ref))


def reference_scores(predictions: list[str], references: list[str], segment: str = "auto") -> dict[str, float]:
    """Corpus BLEU-4 and mean sentence ROUGE-1/2/L F1 (all 0-100) over prediction/reference pairs."""
    hyps = [tokenize(p, segment) for p in predictions]
    refs = [tokenize(r, segment) for r in references]
    n = max(len(hyps), 1)
    return {
        "bleu4": corpus_bleu(hyps, refs),
        "rouge1": 100.0 * sum(rouge_n(h, r, 1) for h, r in zip(hyps, refs)) / n,
        "rouge2": 100.0 * sum(rouge_n(h, r, 2) for h, r in zip(hyps, refs)) / n,
        "rougeL": 100.0 * sum(rouge_l(h, r) for h, r in zip(hyps, refs)) / n,
        "samples": float(len(hyps)),
    }
