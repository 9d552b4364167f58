"""Script-level language handling for the data commands: which script a text is in, and its units.

Chinese has no spaces, so every rule that counted space-separated words (synth's length
heuristic, repetition, verb-noun pairs, near-dedup shingles) counts characters for CJK text
instead. A text counts as CJK when at least a third of its letters are CJK characters: a
Chinese character carries about as much as a short English word, so Chinese text with a brand
name or an English phrase in it ("OPPO Find X7影像能力出色") is still Chinese. `script_of`, the
script-mix statistic and the `script` filter rule, names the most common script instead.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

SCRIPTS = ("latin", "cjk", "kana", "hangul", "cyrillic", "arabic", "greek", "devanagari", "other")
LANGS = ("auto", "en", "zh")
_CJK_CLASS = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
CJK_CHAR = re.compile(f"[{_CJK_CLASS}]")
# a CJK character, or a run of other word characters (a Latin word, a number)
_UNIT = re.compile(f"[{_CJK_CLASS}]|[^\\W{_CJK_CLASS}]+")


def script_of(text: str) -> str:
    """The most common Unicode script among the letters of `text` ('none' when it has no letters)."""
    counts: Counter = Counter()
    for ch in text[:2000]:  # a prefix is enough to tell, and bounds the cost on long rows
        if ch.isalpha():
            counts[_char_script(ch)] += 1
    return counts.most_common(1)[0][0] if counts else "none"


def _char_script(ch: str) -> str:
    if ch.isascii():
        return "latin"
    name = unicodedata.name(ch, "")
    for prefix, script in (("CJK", "cjk"), ("HIRAGANA", "kana"), ("KATAKANA", "kana"), ("HANGUL", "hangul"),
                           ("LATIN", "latin"), ("CYRILLIC", "cyrillic"), ("ARABIC", "arabic"), ("GREEK", "greek"),
                           ("DEVANAGARI", "devanagari")):
        if name.startswith(prefix):
            return script
    return "other"


CJK_SHARE = 1 / 3


def is_cjk(text: str) -> bool:
    """At least CJK_SHARE of the letters (in the first 2000 characters) are CJK characters."""
    letters = [ch for ch in text[:2000] if ch.isalpha()]
    return bool(letters) and sum(CJK_CHAR.match(ch) is not None for ch in letters) >= CJK_SHARE * len(letters)


def lang_of(text: str) -> str:
    """'zh' for CJK text, else 'en' (the two languages the built-in prompts and templates are written in)."""
    return "zh" if is_cjk(text) else "en"


def units(text: str) -> list[str]:
    """Words for counting: each CJK character is one unit, other text splits into word runs."""
    return _UNIT.findall(text.lower())


def char_grams(text: str, n: int) -> list[str]:
    """Character n-grams over the text without whitespace (what repetition checks count in CJK text)."""
    chars = "".join(text.split())
    return [chars[i:i + n] for i in range(len(chars) - n + 1)]
