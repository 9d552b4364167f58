"""Reference metrics for generated text: corpus BLEU through sacrebleu, ROUGE-1/2/L F1 through rouge-score.

The libraries make the figures comparable with papers that report them; tokenization still decides
the numbers, so it is explicit and reported:
- BLEU: sacrebleu's `zh` tokenizer when any reference contains CJK text (each Chinese character is a
  token, other text is split like 13a), otherwise `13a`; the signature goes into the scores.
- ROUGE: rouge-score's own tokenizer (lower-cased ASCII letters and digits, as ROUGE-1.5.5) for
  non-CJK text, which alone would drop Chinese entirely; so CJK runs become one token per character
  (`segment="char"`, the default) or jieba words (`segment="jieba"`, as rouge-chinese + jieba in
  LLaMA-Factory). On text without CJK both equal rouge-score's default tokenizer.
"""

from __future__ import annotations

import re
from functools import lru_cache

from rouge_score import rouge_scorer, tokenize as rouge_tokenize
from rouge_score.tokenizers import Tokenizer
from sacrebleu.metrics import BLEU

_CJK_CLASS = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_CJK = re.compile(f"[{_CJK_CLASS}]")
_CJK_RUN = re.compile(f"([{_CJK_CLASS}]+)")
SEGMENTS = ("auto", "char", "jieba")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


class CjkTokenizer(Tokenizer):
    """rouge-score's tokenizer on non-CJK text; CJK runs split into characters or jieba words."""

    def __init__(self, segment: str = "auto"):
        if segment not in SEGMENTS:
            raise ValueError(f"segment must be one of {SEGMENTS}, got {segment!r}")
        self.segment = "char" if segment == "auto" else segment

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        for i, part in enumerate(_CJK_RUN.split(text)):
            if i % 2 == 0:  # split() puts the captured CJK runs at odd positions
                tokens += rouge_tokenize.tokenize(part, None)
            elif self.segment == "char":
                tokens += list(part)
            else:
                tokens += _jieba_words(part)
        return tokens


def _jieba_words(text: str) -> list[str]:
    import jieba  # optional extra `zh`; imported only when asked for (start-up time, dictionary load)

    return [w for w in jieba.lcut(text) if w.strip()]


def tokenize(text: str, segment: str = "auto") -> list[str]:
    """The tokens ROUGE counts: see the module docstring."""
    return CjkTokenizer(segment).tokenize(text)


def bleu_tokenizer(references: list[str]) -> str:
    """sacrebleu's tokenizer for this corpus: zh if any reference has CJK text, else 13a."""
    return "zh" if any(has_cjk(r) for r in references) else "13a"


def corpus_bleu(predictions: list[str], references: list[str]) -> tuple[float, str]:
    """(BLEU-4 0-100, sacrebleu signature) of predictions against one reference each."""
    bleu = BLEU(tokenize=bleu_tokenizer(references))
    score = bleu.corpus_score(predictions, [references]).score
    return score, str(bleu.get_signature())


@lru_cache(maxsize=8)
def _scorer(types: tuple[str, ...], segment: str) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(types), tokenizer=CjkTokenizer(segment))


def rouge_l(prediction: str, reference: str, segment: str = "auto") -> float:
    """ROUGE-L F1 (0-1) of one prediction against one reference."""
    return _scorer(("rougeL",), segment).score(reference, prediction)["rougeL"].fmeasure


def reference_scores(predictions: list[str], references: list[str], segment: str = "auto") -> dict:
    """Corpus BLEU-4 and mean sentence ROUGE-1/2/L F1 (all 0-100) over prediction/reference pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    bleu, signature = corpus_bleu(predictions, references) if predictions else (0.0, "")
    scorer = _scorer(ROUGE_TYPES, segment)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        for key, score in scorer.score(ref, pred).items():
            sums[key] += score.fmeasure
    n = max(len(predictions), 1)
    return {"bleu4": bleu, **{k: 100.0 * v / n for k, v in sums.items()}, "samples": float(len(predictions)),
            "bleu_signature": signature,
            "rouge_tokens": f"rouge-score tokenizer, CJK by {CjkTokenizer(segment).segment}"}
