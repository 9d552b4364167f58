"""`posttrain data validate`: lint a file: row counts, formats, roles, columns, and every bad row by line.

SFT, preference (every layout the rm / dpo stages read, hh-rlhf transcripts included) and KTO-style
files, detected from the first row. Rows with content problems (data/policy.py: a blank reply or
prompt, chosen == rejected) are what training would drop and count: reported by reason, not as
invalid, unless `strict`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from posttrain.curate.stream import FileParser, iter_rows, progress
from posttrain.data.kto import is_kto_row, row_to_kto
from posttrain.data.policy import ContentProblem
from posttrain.data.preference import row_to_preference
from posttrain.errors import DataError
from posttrain.records import Message

PREFERENCE_COLUMNS = {"chosen", "rejected", "responses"}


class RowReader:
    """FileParser, plus preference and KTO-style rows; with 'auto' the first row decides, then holds."""

    def __init__(self, fmt: str = "auto"):
        self.parse = FileParser(fmt)
        self.kind = None if fmt == "auto" else "sft"

    @property
    def fmt(self) -> str:
        return self.parse.fmt if self.kind == "sft" else self.kind

    def __call__(self, row: dict, source: str) -> list[Message]:
        if self.kind is None:
            self.kind = "preference" if PREFERENCE_COLUMNS & row.keys() else "kto" if is_kto_row(row) else "sft"
        if self.kind == "kto":
            return row_to_kto(row, source=source)[0].messages
        if self.kind == "sft":
            return self.parse(row, source).messages
        rec = row_to_preference(row, source=source)
        if len({m.content for m in rec.responses}) < len(rec.responses):  # training drops these too
            raise ContentProblem("chosen_equals_rejected", f"{source}: two responses are identical")
        return [*rec.prompt, rec.responses[0]]


def validate(path: str | Path, fmt: str = "auto", max_errors: int = 20, strict: bool = False) -> dict:
    """Parse every row with the spine's parser; collect (not raise) row errors, up to `max_errors` shown."""
    formats, roles, columns, turns, dropped = Counter(), Counter(), Counter(), Counter(), Counter()
    errors: list[str] = []
    rows = bad = 0
    parse = RowReader(fmt)
    for source, row in progress(iter_rows(path), "validate"):
        rows += 1
        columns.update(row.keys())
        try:
            messages = parse(row, source)
            formats[parse.fmt] += 1
        except ContentProblem as problem:
            if not strict:
                dropped[problem.reason] += 1
                continue
            bad += 1
            if len(errors) < max_errors:
                errors.append(str(problem))
            continue
        except DataError as err:
            bad += 1
            if len(errors) < max_errors:
                errors.append(str(err))
            continue
        roles.update(m.role for m in messages)
        turns[len(messages)] += 1
    return {"file": str(path), "rows": rows, "valid": rows - bad - sum(dropped.values()), "invalid": bad,
            "dropped": dict(dropped), "errors": errors,
            "formats": dict(formats), "roles": dict(roles), "columns": dict(columns),
            "messages_per_row": dict(sorted(turns.items()))}


def format_report(report: dict) -> str:
    lines = [f"{report['file']}: {report['rows']} rows, {report['valid']} valid, {report['invalid']} invalid",
             f"  dropped (content problems; training drops and counts them): {report['dropped'] or 'none'}",
             f"  formats: {report['formats']}", f"  roles: {report['roles']}",
             f"  columns (rows having each): {report['columns']}",
             f"  messages per row: {report['messages_per_row']}"]
    lines += [f"  error: {e}" for e in report["errors"]]
    if report["invalid"] > len(report["errors"]):
        lines.append(f"  ... and {report['invalid'] - len(report['errors'])} more invalid rows")
    return "\n".join(lines)
