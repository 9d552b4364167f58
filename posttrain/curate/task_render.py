"""One task row -> {instruction, input, output}: the values a `from-task` template fills in.

Besides the row's own columns a template can use {label} (mapped through the task's labels in
the row's language), {options} (the label words), {choices}/{letters}/{answer} for multiple
choice (options as a list, a dict or A/B/C/D columns; the answer as a letter, an index or the
option's text) and {data} for data-to-text (chosen field columns, or a dict column `data`).
Every problem names the row and the field.
"""

from __future__ import annotations

import random
import string
from collections import Counter

from posttrain.errors import DataError

LETTERS = string.ascii_uppercase[:10]
STYLE = {  # how lists read in each language: quotes and separators
    "en": {"quote": '"{}"', "sep": ", ", "field": "{}: {}", "field_sep": "; "},
    "zh": {"quote": "“{}”", "sep": "、", "field": "{}：{}", "field_sep": "；"},
}
ANSWER_STYLES = ("letter", "text", "both")


class Fields(dict):
    """Template values; a placeholder the row lacks is an error naming row and field."""

    def __init__(self, values: dict, source: str):
        super().__init__(values)
        self.source = source

    def __missing__(self, key):
        raise DataError(f"{self.source}: field '{key}' is missing (the template uses {{{key}}})")


def options(row: dict, source: str) -> list[str]:
    """The row's answer options: `options` (list, or dict keyed by letter) or A, B, C... columns."""
    value = row.get("options", row.get("choices"))
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value)]
    if value is None:
        value = [row[k] for k in LETTERS if row.get(k) not in (None, "")]
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, (str, int, float)) for v in value):
        raise DataError(f"{source}: field 'options' must be a list (or dict, or A/B/C/D columns) of at least two "
                        f"options, got {str(value)[:60]!r}")
    if len(value) > len(LETTERS):
        raise DataError(f"{source}: field 'options' has {len(value)} options; at most {len(LETTERS)}")
    return [str(v) for v in value]


def answer_index(answer, opts: list[str], source: str) -> int:
    """The answer as an option index: a letter (A-J), a 0-based index or the option's exact text."""
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in LETTERS[:len(opts)]:
        return LETTERS.index(text.upper())
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(opts):
        return answer
    if text in opts:
        return opts.index(text)
    raise DataError(f"{source}: field 'answer' is {text!r}: not a letter {LETTERS[0]}-{LETTERS[len(opts) - 1]}, "
                    "an option index or an option's text")


def choice_values(row: dict, source: str, answer_style: str) -> dict:
    opts = options(row, source)
    i = answer_index(row.get("answer"), opts, source)
    answer = {"letter": LETTERS[i], "text": opts[i], "both": f"{LETTERS[i]}. {opts[i]}"}[answer_style]
    return {"choices": "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(opts)),
            "letters": "/".join(LETTERS[:len(opts)]), "answer": answer}


def data_value(row: dict, fields: list[str] | None, lang: str, source: str, empty: Counter) -> str:
    """data_to_text's {data}: "field: value" pairs from the chosen columns or a dict column `data`;
    empty fields are left out and counted in `empty`."""
    style = STYLE[lang]
    if fields:
        pairs = [(f, row.get(f)) for f in fields]
    elif isinstance(row.get("data"), dict):
        pairs = list(row["data"].items())
    else:
        return row.get("data") if isinstance(row.get("data"), str) else _no_data(source)
    kept = [(k, v) for k, v in pairs if v not in (None, "")]
    empty.update(k for k, v in pairs if v in (None, ""))
    if not kept:
        raise DataError(f"{source}: fields {', '.join(str(k) for k, _ in pairs)} are all missing/empty")
    return style["field_sep"].join(style["field"].format(k, v) for k, v in kept)


def _no_data(source: str) -> str:
    raise DataError(f"{source}: field 'data' is missing (give a dict or text column `data`, or --fields)")


def render(spec: dict, row: dict, source: str, rng: random.Random, lang: str, *, fields: list[str] | None = None,
           answer_style: str = "letter", empty: Counter | None = None) -> dict:
    """One task row -> {instruction, input, output} with a template of `lang` chosen by `rng`."""
    for col in spec["columns"]:
        if col == "data" and (fields or isinstance(row.get("data"), dict)):
            continue
        if row.get(col) is None or row.get(col) == "":
            raise DataError(f"{source}: field '{col}' is missing/empty")
    labels = spec["labels"][lang]
    values = {**spec["defaults"][lang], **{k: str(v) for k, v in row.items() if v is not None}}
    if "label" in row:
        label = str(row["label"])
        if labels and label not in labels:
            raise DataError(f"{source}: field 'label' has value {label!r}; known labels: {sorted(labels)}")
        values["label"] = labels.get(label, label)
    words = list(dict.fromkeys(labels.values()))
    values.setdefault("options", STYLE[lang]["sep"].join(STYLE[lang]["quote"].format(w) for w in words))
    if spec.get("choices"):
        values.update(choice_values(row, source, answer_style))
    if "data" in spec["columns"]:
        values["data"] = data_value(row, fields, lang, source, empty if empty is not None else Counter())
    template = rng.choice(spec["templates"][lang])
    filled = Fields(values, source)
    return {key: template.get(key, "").format_map(filled) for key in ("instruction", "input", "output")}
