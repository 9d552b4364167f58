"""Built-in verifiable rewards: the final answer checked against the prompt's reference, and a format regex.

The final answer of a text is what follows its last `####` on that line (GSM8K's convention) or the
content of its last `\\boxed{...}` (MATH's); a reference without either marker is itself the answer.
Kind `number` reads the last number in the text instead: what a small chat model writes unprompted
("... so Tom has 13 apples."), with no format to learn or to game.
Answers compare after normalisation (spaces, `$`, thousands commas and a trailing period dropped),
and numbers by value, so `1,000` equals `1000` and `8.0` equals `8`; `14 apples` does not equal `14`.
"""

from __future__ import annotations

import re

HASH_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
BOXED = "\\boxed{"
LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
ANSWER_FORMATS = ("auto", "hash", "boxed", "number")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces kept), or None when there is none or it is unclosed."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, pos = 1, start + len(BOXED)
    for i in range(pos, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[pos:i]
    return None


def last_hash(text: str) -> str | None:
    """What follows the last `####` on its line, or None."""
    found = HASH_ANSWER.findall(text)
    return found[-1] if found else None


def last_number(text: str) -> str | None:
    """The last number in the text (sign, thousands commas and decimals kept; a sentence's period is not a
    decimal point), or None."""
    found = LAST_NUMBER.findall(text)
    return found[-1].rstrip(",") if found else None


def final_answer(text: str, kind: str = "auto") -> str | None:
    """The text's final answer by `kind`: hash (`#### N`), boxed (`\\boxed{N}`), auto (the marker that
    appears last in the text), number (the last number); None when the marker is missing."""
    if kind == "number":
        return last_number(text)
    if kind == "hash":
        return last_hash(text)
    if kind == "boxed":
        return last_boxed(text)
    if kind != "auto":
        raise ValueError(f"unknown answer format {kind!r}; use one of {', '.join(ANSWER_FORMATS)}")
    return last_boxed(text) if text.rfind(BOXED) > text.rfind("####") else last_hash(text)


def normalize_answer(answer: str) -> str:
    """Spaces, `$` and a trailing period removed, commas between digits dropped, lower case."""
    out = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer.strip().replace("$", ""))
    return re.sub(r"\s+", "", out).rstrip(".").lower()


def same_answer(a: str, b: str) -> bool:
    na, nb = normalize_answer(a), normalize_answer(b)
    if na == nb:
        return bool(na)
    try:
        return float(na) == float(nb)
    except ValueError:
        return False


class ExactMatch:
    """1.0 when the response's final answer equals the reference's, else 0.0 (a missing answer is wrong)."""

    def __init__(self, kind: str = "auto"):
        final_answer("", kind)  # rejects an unknown kind now, not at the first reply
        self.kind = kind

    def __call__(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
        scores = []
        for response, reference in zip(responses, references, strict=True):
            if reference is None:
                raise ValueError("exact_match needs each prompt's reference answer")
            gold = final_answer(reference, self.kind)
            gold = reference if gold is None else gold
            got = final_answer(response, self.kind)
            scores.append(float(got is not None and same_answer(got, gold)))
        return scores


class FormatMatch:
    """1.0 when the whole response (stripped) matches the regex (`.` also matches newlines), else 0.0."""

    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern, re.DOTALL)

    def __call__(self, prompts: list[str], responses: list[str], references=None) -> list[float]:
        return [float(self.pattern.fullmatch(r.strip()) is not None) for r in responses]
