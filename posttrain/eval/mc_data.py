"""Multiple-choice benchmark files -> items: C-Eval, CMMLU, MMLU CSV layouts and a generic JSONL.

Layouts handled (one CSV per subject, one folder per split):
  C-Eval  val/accountant_val.csv    header: id,question,A,B,C,D,answer[,explanation]
  CMMLU   test/agronomy.csv         header: ,Question,A,B,C,D,Answer
  MMLU    test/anatomy_test.csv     no header: question,A,B,C,D,answer
  JSONL   any.jsonl                 {"question", "choices": [...] or "A".."D", "answer": "B" or 1, "subject"?}
Headerless CSVs are read with the csv module: `datasets` would take their first question as a header.
"""

from __future__ import annotations

import csv
import string
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import DataError
from posttrain.data.reading import read_rows, source_of

LETTERS = string.ascii_uppercase
QUESTION_COLUMNS = ("question", "input", "prompt", "query")
ANSWER_COLUMNS = ("answer", "label", "target", "correct")


@dataclass
class MCItem:
    question: str
    options: list[str]  # option texts, lettered A, B, C, ... in order
    answer: str  # the correct letter
    subject: str
    source: str  # "file row N", for messages and the per-item cache key


def _answer_letter(value, n_options: int, source: str) -> str:
    """'B', 'b', 1 (0-based index) -> 'B'; anything else is a DataError naming the row."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        idx = int(value)
        if 0 <= idx < n_options:
            return LETTERS[idx]
    elif isinstance(value, str) and value.strip().upper() in LETTERS[:n_options] and value.strip():
        return value.strip().upper()
    raise DataError(f"{source}: answer {value!r} is not one of {', '.join(LETTERS[:n_options])} or a 0-based index")


def _is_header(row: list[str]) -> bool:
    """A header row names its columns: single letters for options, or a question/answer name."""
    cells = {c.strip().lower() for c in row}
    return ("a" in cells and "b" in cells) or bool(cells & set(QUESTION_COLUMNS)) or bool(cells & set(ANSWER_COLUMNS))


def _items_from_header(header: list[str], rows: list[list[str]], subject: str, path: Path) -> list[MCItem]:
    lower = [h.strip().lower() for h in header]
    options = [i for i, h in enumerate(header) if len(h.strip()) == 1 and h.strip().upper() in LETTERS]
    q = next((lower.index(n) for n in QUESTION_COLUMNS if n in lower), None)
    ans = next((lower.index(n) for n in ANSWER_COLUMNS if n in lower), None)
    if q is None or ans is None or len(options) < 2:
        raise DataError(f"{path}: header {header} needs a question column ({'/'.join(QUESTION_COLUMNS)}), "
                        f"option columns A, B, ... and an answer column ({'/'.join(ANSWER_COLUMNS)})")
    items = []
    for n, row in enumerate(rows, start=2):
        source = f"{path} row {n}"
        texts = [row[i] for i in options]
        items.append(MCItem(row[q], texts, _answer_letter(row[ans], len(texts), source), subject, source))
    return items


def _items_headerless(rows: list[list[str]], subject: str, path: Path) -> list[MCItem]:
    items = []
    for n, row in enumerate(rows, start=1):
        source = f"{path} row {n}"
        if len(row) < 4:
            raise DataError(f"{source}: expected question, 2+ options and an answer, got {len(row)} columns")
        texts = row[1:-1]
        items.append(MCItem(row[0], texts, _answer_letter(row[-1], len(texts), source), subject, source))
    return items


def read_csv_items(path: str | Path, subject: str) -> list[MCItem]:
    """One subject's CSV, with or without a header row."""
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: the file is empty")
    if _is_header(rows[0]):
        return _items_from_header(rows[0], rows[1:], subject, path)
    return _items_headerless(rows, subject, path)


def read_jsonl_items(path: str | Path, default_subject: str) -> list[MCItem]:
    """Generic rows: question, choices (list) or lettered option fields, answer, optional subject."""
    rows = read_rows(path)
    items = []
    for i, row in enumerate(rows):
        source = source_of(path, i)
        if row.get("choices"):
            texts = [str(c) for c in row["choices"]]
        else:
            texts = [str(row[k]) for k in LETTERS if row.get(k) is not None]
        if "question" not in row or len(texts) < 2 or row.get("answer") is None:
            raise DataError(f"{source}: needs 'question', 'choices' (or fields A, B, ...) and 'answer'")
        subject = row.get("subject") or default_subject
        items.append(MCItem(str(row["question"]), texts, _answer_letter(row["answer"], len(texts), source),
                            str(subject), source))
    return items


def subject_of(path: Path, split: str) -> str:
    """'accountant_val.csv' -> 'accountant' (C-Eval/MMLU); 'agronomy.csv' -> 'agronomy' (CMMLU)."""
    stem = path.stem
    return stem[: -len(split) - 1] if stem.endswith("_" + split) else stem


def detect_layout(data: str | Path, split: str) -> str:
    """'ceval' (header id,question,A..,answer), 'cmmlu' (header ,Question,A..,Answer), 'mmlu' (no header),
    'csv' (another header) or 'jsonl', judged by the first row of the split's first CSV file."""
    data = Path(data)
    if data.is_file():
        return "jsonl"
    first = next(iter(sorted((data / split).glob("*.csv"))), None)
    if first is None:
        return "csv"
    with first.open(encoding="utf-8-sig", newline="") as f:
        row = next((r for r in csv.reader(f) if any(c.strip() for c in r)), [])
    if not _is_header(row):
        return "mmlu"
    cells = [c.strip() for c in row]
    if cells[:2] == ["id", "question"]:
        return "ceval"
    if cells[:2] == ["", "Question"]:
        return "cmmlu"
    return "csv"


def load_split(data: str | Path, split: str, subjects: list[str] | None = None) -> dict[str, list[MCItem]]:
    """subject -> items for `split`: data/<split>/*.csv (C-Eval, CMMLU, MMLU) or a JSONL file."""
    data = Path(data)
    if data.is_file():
        items = read_jsonl_items(data, data.stem)
        out: dict[str, list[MCItem]] = {}
        for item in items:
            out.setdefault(item.subject, []).append(item)
    else:
        folder = data / split
        if not folder.is_dir():
            raise DataError(f"{data}: no {split}/ folder of per-subject CSV files")
        out = {subject_of(p, split): read_csv_items(p, subject_of(p, split)) for p in sorted(folder.glob("*.csv"))}
    if subjects:
        missing = sorted(set(subjects) - set(out))
        if missing:
            raise DataError(f"{data}: no {split} data for subject(s) {', '.join(missing)}")
        out = {s: out[s] for s in subjects}
    return out
