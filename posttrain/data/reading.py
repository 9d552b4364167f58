"""Read a data file into a `datasets.Dataset`, and name a row's place in that file for errors.

Reading goes through `datasets.load_dataset`, so big files are memory-mapped Arrow and later
runs reuse the cache. When the JSON reader fails we re-scan the file ourselves: datasets'
message names neither the file nor the line, and a user needs both to fix the file. Text must
be UTF-8: the JSON reader loads other bytes unchecked (a row then fails far from its file), so
the loaded table is validated and a bad file re-scanned for its first non-UTF-8 line.
Text files may come gzipped (`.jsonl.gz`, as hh-rlhf ships): datasets decompresses them, and the
re-scans here read them through gzip, so errors still name the line.
"""

from __future__ import annotations

import bisect
import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

from posttrain.errors import DataError

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
GZIPPED = (".json", ".jsonl", ".csv")  # these may also come as NAME.jsonl.gz and so on


def data_suffix(path: str | Path) -> str:
    """The suffix that says a file's format: '.jsonl' for both rows.jsonl and rows.jsonl.gz."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz" and suffixes[-2] in GZIPPED:
        return suffixes[-2]
    return Path(path).suffix.lower()


def _open(path: Path, mode: str = "rb", **kwargs):
    """open(), through gzip for a .gz file."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, mode if "b" in mode else mode + "t", **kwargs)
    return path.open(mode, **kwargs)


def open_text(path: str | Path):
    """A data file as UTF-8 text (a BOM skipped, bad bytes replaced: for sniffing), gunzipped if .gz."""
    return _open(Path(path), "r", encoding="utf-8-sig", errors="replace")


def read_rows(path: str | Path):
    """A .json (array or JSON lines), .jsonl, .csv (each also gzipped: .jsonl.gz ...) or .parquet file
    -> datasets.Dataset."""
    import datasets  # heavy (pyarrow, pandas): imported on first read, not with the module
    import pyarrow as pa  # heavy: with datasets above

    path = Path(path)
    builder = BUILDERS.get(data_suffix(path))
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(BUILDERS)} "
                        f"({', '.join(GZIPPED)} also gzipped, e.g. .jsonl.gz)")
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    if path.stat().st_size == 0 or (builder != "parquet" and _only_blank(path)):
        raise DataError(f"{path}: no rows (the file is empty or only blank lines)")
    if builder == "csv":  # the CSV reader fails on non-UTF-8 text too, but logs its own multi-line error first
        _find_bad_utf8(path)
    try:
        rows = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train")
    except Exception as err:  # datasets raises many types here; we re-diagnose below
        if builder != "parquet":
            _find_bad_utf8(path)
        if builder == "json":
            _find_bad_json(path)  # raises DataError naming the line, when there is one
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: cannot be read as {builder}: {first}") from err
    if builder != "parquet":
        try:
            rows.data.table.validate(full=True)  # checks that every string is valid UTF-8
        except pa.ArrowInvalid:
            _find_bad_utf8(path)
            raise DataError(f"{path}: holds text that is not valid UTF-8; save it as UTF-8") from None
    return rows


def _only_blank(path: Path) -> bool:
    """True for a text file of nothing but whitespace (and a BOM); stops at the first other byte."""
    with _open(path) as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            if block.replace(b"\xef\xbb\xbf", b"").strip():
                return False
    return True


def _decode_line(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} line {number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} "
                        "of the line); save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _find_bad_utf8(path: Path) -> None:
    """Raise a DataError at the first line that is not valid UTF-8."""
    with _open(path) as f:
        for number, raw in enumerate(f, start=1):
            _decode_line(raw, path, number)


def iter_json_lines(path: Path):
    """Yield (line number, row) of a JSON-lines file, skipping blank lines; a bad line is a DataError."""
    with _open(Path(path)) as f:
        for number, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: not valid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def _find_bad_json(path: Path) -> None:
    """Raise a DataError at the first malformed line (JSON lines) or position (JSON array)."""
    with open_text(path) as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        try:
            with _open(path, "r", encoding="utf-8-sig") as f:
                rows = json.loads(f.read())
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path} row {i + 1}: expected a JSON object, got {type(row).__name__}")
        return
    lines = sum(1 for _ in iter_json_lines(path))
    with open_text(path) as f:
        blank = sum(1 for _ in f) > lines
    if blank:
        # datasets' mixed-type JSON handling fails on blank lines; every line parsed, so say so
        raise DataError(f"{path}: every line is valid JSON, but datasets' JSON reader fails on files with "
                        "blank lines and mixed-type fields; remove the blank lines")


def source_of(path: str | Path, row_index: int) -> str:
    """Where row `row_index` (0-based, in read order) lives: "data.jsonl line 8" or "data.csv row 8"."""
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        mtime = 0.0
    json_lines, blanks = _layout(str(path), mtime)
    if not json_lines:
        return f"{path} row {row_index + 1}"
    # The JSON reader skips blank lines: find the line L holding row r, i.e. L = r + 1 + blanks before L.
    line = row_index + 1
    while (shifted := row_index + 1 + bisect.bisect_right(blanks, line)) != line:
        line = shifted
    return f"{path} line {line}"


@lru_cache(maxsize=32)
def _layout(path: str, mtime: float) -> tuple[bool, tuple[int, ...]]:
    """(is JSON lines, 1-based numbers of its blank lines), cached per file version (mtime)."""
    del mtime  # part of the cache key only
    suffix = data_suffix(path)
    try:
        with open_text(path) as f:
            if suffix != ".jsonl" and (suffix != ".json" or f.read(4096).lstrip().startswith("[")):
                return False, ()
            f.seek(0)
            return True, tuple(n for n, line in enumerate(f, start=1) if not line.strip())
    except OSError:
        return suffix == ".jsonl", ()
