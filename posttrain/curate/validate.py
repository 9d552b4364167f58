"""`posttrain data validate`: lint a file: row counts, formats, roles, columns, and every bad row by line."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from posttrain.curate.stream import FileParser, iter_rows, progress
from posttrain.errors import DataError


def validate(path: str | Path, fmt: str = "auto", max_errors: int = 20) -> dict:
    """Parse every row with the spine's parser; collect (not raise) row errors, up to `max_errors` shown."""
    formats, roles, columns, turns = Counter(), Counter(), Counter(), Counter()
    errors: list[str] = []
    rows = bad = 0
    parse = FileParser(fmt)
    for source, row in progress(iter_rows(path), "validate"):
        rows += 1
        columns.update(row.keys())
        try:
            conv = parse(row, source)
            formats[parse.fmt] += 1
        except DataError as err:
            bad += 1
            if len(errors) < max_errors:
                errors.append(str(err))
            continue
        roles.update(m.role for m in conv.messages)
        turns[len(conv.messages)] += 1
    return {"file": str(path), "rows": rows, "valid": rows - bad, "invalid": bad, "errors": errors,
            "formats": dict(formats), "roles": dict(roles), "columns": dict(columns),
            "messages_per_row": dict(sorted(turns.items()))}


def format_report(report: dict) -> str:
    lines = [f"{report['file']}: {report['rows']} rows, {report['valid']} valid, {report['invalid']} invalid",
             f"  formats: {report['formats']}", f"  roles: {report['roles']}",
             f"  columns (rows having each): {report['columns']}",
             f"  messages per row: {report['messages_per_row']}"]
    lines += [f"  error: {e}" for e in report["errors"]]
    if report["invalid"] > len(report["errors"]):
        lines.append(f"  ... and {report['invalid'] - len(report['errors'])} more invalid rows")
    return "\n".join(lines)
