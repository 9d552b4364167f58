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
_LETTER = re.compile(r"[^\W\d_]")  # what str.isalpha() calls a letter, CJK characters included
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_OTHER_LETTER = re.compile(f"[^\\W\\d_A-Za-z{_CJK_CLASS}]")
# a CJK character, or a run of other word characters (a Latin word, a number)
_UNIT = re.compile(f"[{_CJK_CLASS}]|[^\\W{_CJK_CLASS}]+")


def script_of(text: str) -> str:
    """The most common Unicode script among the letters of `text` ('none' when it has no letters)."""
    prefix = text[:2000]  # a prefix is enough to tell, and bounds the cost on long rows
    # ASCII letters and CJK characters counted in C; only the other letters need a name lookup
    counts = Counter({"latin": len(_ASCII_LETTER.findall(prefix)), "cjk": len(CJK_CHAR.findall(prefix))})
    for ch in _OTHER_LETTER.findall(prefix):
        counts[_char_script(ch)] += 1
    counts = +counts  # drop zero counts
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
    if not CJK_CHAR.search(text, 0, 2000):  # the common case in English data, decided in C
        return False
    letters = len(_LETTER.findall(text, 0, 2000))
    return len(CJK_CHAR.findall(text, 0, 2000)) >= CJK_SHARE * letters


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
