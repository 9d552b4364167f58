"""Streaming row access shared by the data commands: read, write atomically, record rejects.

JSON-lines files are read line by line (bounded memory, exact line numbers). JSON arrays, CSV
and Parquet go through `data.reading.read_rows` (memory-mapped Arrow), so the same commands
work on any size the spine can read.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from posttrain.data.formats import detect_format, row_to_conversation
from posttrain.data.images import has_images
from posttrain.data.policy import ContentProblem, count_problem
from posttrain.data.reading import data_suffix, iter_json_lines, open_text, read_rows, source_of
from posttrain.records import Conversation
from posttrain.errors import DataError


def is_json_lines(path: Path) -> bool:
    """A .jsonl file, or a .json file that does not start with '[' (JSON lines named .json); also gzipped."""
    suffix = data_suffix(path)
    if suffix == ".jsonl":
        return True
    if suffix != ".json":
        return False
    with open_text(path) as f:
        return not f.read(4096).lstrip().startswith("[")


def iter_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (source, row) for every row: source is "file line N" (JSON lines) or "file row N"."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if not is_json_lines(path):
        rows = read_rows(path)
        for i, row in enumerate(rows):
            yield source_of(path, i), {k: v for k, v in row.items() if v is not None}
        return
    for number, row in iter_json_lines(path):
        yield f"{path} line {number}", row


def parse(row: dict, source: str, fmt: str = "auto", variables: dict | None = None) -> Conversation:
    """The spine's parser (formats.row_to_conversation): one code path for every command."""
    return row_to_conversation(row, fmt, source=source, variables=variables)


class FileParser:
    """Parse one file's rows; 'auto' detects the format from the first row, then holds it.

    Holding it means a later row missing a field gets the field-level error ("field 'output'
    is missing") rather than "cannot detect the format". `images`: a row that carries images is parsed as a
    vision model's run parses it (its images kept, placeholders counted); otherwise such rows are errors.
    """

    def __init__(self, fmt: str = "auto", variables: dict | None = None, images: bool = False):
        self.fmt, self.variables, self.images = fmt, variables, images

    def __call__(self, row: dict, source: str) -> Conversation:
        if self.fmt == "auto":
            self.fmt = detect_format(row.keys(), source)
        return row_to_conversation(row, self.fmt, source=source, variables=self.variables,
                                   images=self.images and has_images(row))


class AtomicJsonl:
    """Write JSON lines to `path.tmp`, rename onto `path` only on success (never a half file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.count = 0
        self._f = None

    def __enter__(self) -> AtomicJsonl:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.tmp.open("w", encoding="utf-8")
        return self

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


class RowPass:
    """One pass of a command over a file: its rows (counted, behind a progress bar) parsed by one FileParser,
    kept rows written to `out`, rejected ones with their reasons beside it (out.rejected.jsonl); both atomic."""

    def __init__(self, path: str | Path, out: str | Path, fmt: str, desc: str):
        self.path, self.desc, self.parse, self.rows = path, desc, FileParser(fmt), 0
        self.writer, self.rejects = AtomicJsonl(out), AtomicJsonl(side_path(out, "rejected"))
        self._files = ExitStack()

    def __enter__(self) -> RowPass:
        with ExitStack() as files:
            files.enter_context(self.writer)
            files.enter_context(self.rejects)
            self._files = files.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._files.__exit__(*exc)

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        for source, row in progress(iter_rows(self.path), self.desc):
            self.rows += 1
            yield source, row

    def reject(self, counts: Counter, problem: ContentProblem, strict: bool, source: str, row: dict, **extra) -> None:
        """A row's content problem (data/policy.py): counted under its reason, or fatal when strict; the row is
        kept, with why, in the rejected file."""
        count_problem(counts, problem, strict)
        self.rejects.write({"source": source, **extra, "reason": str(problem), "row": row})


def reason_of(err: Exception, source: str) -> str:
    """A row error's reason without its source and value, to count rows by reason:
    "f.jsonl line 4: field 'output' must be a string, got int: 5" -> "field 'output' must be a string"."""
    text = str(err).removeprefix(f"{source}: ")
    return re.split(r", got |: ", text, maxsplit=1)[0]


def side_path(out: str | Path, what: str) -> Path:
    """out.jsonl -> out.<what>.jsonl: where removed/rejected rows go, beside the output."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{what}.jsonl")


def conversation_text(conv: Conversation) -> str:
    """All message contents (or the plain text) joined: what dedup and length rules look at."""
    if conv.text is not None:
        return conv.text
    parts = [m.content for m in conv.messages]
    parts += [json.dumps(c, sort_keys=True) for m in conv.messages for c in (m.tool_calls or [])]
    return "\n".join(parts)


def prompt_text(conv: Conversation) -> str:
    """The first user turn: the 'instruction' that diversity stats and synth seeds look at."""
    return next((m.content for m in conv.messages if m.role == "user"), conv.text or "")


def response_text(conv: Conversation) -> str:
    """The last assistant turn (the text training learns to produce)."""
    return next((m.content for m in reversed(conv.messages) if m.role == "assistant"), conv.text or "")


_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower case, collapsed whitespace: two rows equal after this are exact duplicates."""
    return _SPACE.sub(" ", text.lower()).strip()


def progress(iterable, desc: str, total: int | None = None):
    """A tqdm bar on a terminal; silent in logs and tests (tqdm's disable=None)."""
    return tqdm(iterable, desc=desc, total=total, unit=" rows", disable=None, file=sys.stderr, mininterval=1.0)
