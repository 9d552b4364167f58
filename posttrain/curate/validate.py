"""`posttrain data validate`: lint a file: row counts, formats, roles, columns, and every bad row by line.

SFT, preference (every layout the rm / dpo stages read, hh-rlhf transcripts included) and KTO-style
files, detected from the first row. Rows with content problems (data/policy.py: a blank reply or
prompt, chosen == rejected) are what training would drop and count: reported by reason, not as
invalid, unless `strict`. SFT rows with images (mllm `images`, OpenAI image_url parts) are parsed as a
vision model's run parses them, and every image must exist and decode (each distinct image decoded once;
relative paths are relative to the data file's folder, as in training)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from posttrain.curate.stream import FileParser, iter_rows, progress
from posttrain.data.images import image_fields, load_image, resolve
from posttrain.data.kto import is_kto_row, row_to_kto
from posttrain.data.policy import ContentProblem
from posttrain.data.preference import row_to_preference
from posttrain.errors import DataError
from posttrain.records import Message

PREFERENCE_COLUMNS = {"chosen", "rejected", "responses"}


class RowReader:
    """FileParser, plus preference and KTO-style rows; with 'auto' the first row decides, then holds."""

    def __init__(self, fmt: str = "auto"):
        self.parse = FileParser(fmt, images=True)
        self.kind = None if fmt == "auto" else "sft"

    @property
    def fmt(self) -> str:
        return self.parse.fmt if self.kind == "sft" else self.kind

    def __call__(self, row: dict, source: str) -> tuple[list[Message], list[str]]:
        """(messages, image references in placeholder order)."""
        if self.kind is None:
            self.kind = "preference" if PREFERENCE_COLUMNS & row.keys() else "kto" if is_kto_row(row) else "sft"
        if self.kind == "kto":
            return row_to_kto(row, source=source)[0].messages, []
        if self.kind == "sft":
            conv = self.parse(row, source)
            return conv.messages, conv.images
        rec = row_to_preference(row, source=source)
        if len({m.content for m in rec.responses}) < len(rec.responses):  # training drops these too
            raise ContentProblem("chosen_equals_rejected", f"{source}: two responses are identical")
        return [*rec.prompt, rec.responses[0]], []


class ImageCheck:
    """Every image exists and decodes; each distinct reference is decoded once, its verdict remembered."""

    def __init__(self, data_file: str | Path):
        self.folder = Path(data_file).parent
        self.verdicts: dict[str, str | None] = {}  # resolved ref -> error text, None when it decodes

    def __call__(self, images: list[str], row: dict, source: str) -> None:
        for ref, field in zip(images, image_fields(images, row)):
            resolved = resolve(ref, self.folder)
            if resolved not in self.verdicts:
                try:
                    load_image(resolved)
                    self.verdicts[resolved] = None
                except DataError as err:
                    self.verdicts[resolved] = str(err)
            if self.verdicts[resolved] is not None:
                raise DataError(f"{source}: field '{field}': {self.verdicts[resolved]}")


def validate(path: str | Path, fmt: str = "auto", max_errors: int = 20, strict: bool = False) -> dict:
    """Parse every row with the spine's parser; collect (not raise) row errors, up to `max_errors` shown."""
    formats, roles, columns, turns, dropped = Counter(), Counter(), Counter(), Counter(), Counter()
    errors: list[str] = []
    rows = bad = n_images = 0
    parse, check_images = RowReader(fmt), ImageCheck(path)
    for source, row in progress(iter_rows(path), "validate"):
        rows += 1
        columns.update(row.keys())
        try:
            messages, images = parse(row, source)
            check_images(images, row, source)
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
        n_images += len(images)
    return {"file": str(path), "rows": rows, "valid": rows - bad - sum(dropped.values()), "invalid": bad,
            "dropped": dict(dropped), "errors": errors,
            "formats": dict(formats), "roles": dict(roles), "columns": dict(columns),
            "messages_per_row": dict(sorted(turns.items())), "images": n_images,
            "distinct_images": len(check_images.verdicts)}


def format_report(report: dict) -> str:
    lines = [f"{report['file']}: {report['rows']} rows, {report['valid']} valid, {report['invalid']} invalid",
             f"  dropped (content problems; training drops and counts them): {report['dropped'] or 'none'}",
             f"  formats: {report['formats']}", f"  roles: {report['roles']}",
             f"  columns (rows having each): {report['columns']}",
             f"  messages per row: {report['messages_per_row']}"]
    if report["images"]:
        lines.append(f"  images: {report['images']} in valid rows ({report['distinct_images']} distinct files/URLs "
                     "checked: they exist and decode)")
    lines += [f"  error: {e}" for e in report["errors"]]
    if report["invalid"] > len(report["errors"]):
        lines.append(f"  ... and {report['invalid'] - len(report['errors'])} more invalid rows")
    return "\n".join(lines)
