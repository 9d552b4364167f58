"""`posttrain data from-task`: labelled NLP task rows -> alpaca instruction rows via templates.

Templates (posttrain/resources/task_templates.yaml, extendable with --templates) give several
phrasings per task type, in English and Chinese; one is sampled per row from a seeded
generator, so the same seed always gives the same file while instructions still vary (the
FLAN recipe). The language is the row's (CJK text -> Chinese templates) unless --lang says;
a task with no templates in that language falls back to the other, counted in the report.
Rows that cannot be rendered stop the run with file, row and field, or with --skip-bad go to
`<out>.rejected.jsonl`, counted by reason.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import yaml

from posttrain.curate.lang import LANGS, lang_of
from posttrain.curate.stream import AtomicJsonl, iter_rows, progress, reason_of, side_path
from posttrain.curate.task_render import ANSWER_STYLES, render
from posttrain.data.formats import rename_columns
from posttrain.errors import DataError
from posttrain.typed_config import yaml_error_text

BUILTIN = Path(__file__).resolve().parents[1] / "resources" / "task_templates.yaml"
TEMPLATE_LANGS = ("en", "zh")


def _template_lang(template: dict, where: str) -> str:
    lang = template.get("lang") or lang_of(template.get("instruction", "") + template.get("input", ""))
    if lang not in TEMPLATE_LANGS:
        raise DataError(f"{where}: template `lang` must be one of {', '.join(TEMPLATE_LANGS)}, got {lang!r}")
    return lang


def _merge(base: dict, spec: dict, where: str) -> None:
    """Fold one YAML task entry into `base` (templates appended per language, other keys override)."""
    for lang, block in (("en", spec), ("zh", spec.get("zh") or {})):
        if not isinstance(block, dict) or not isinstance(block.get("templates", []), list):
            raise DataError(f"{where} must be a mapping with a `templates` list")
        for template in block.get("templates", []):
            if not isinstance(template, dict) or "instruction" not in template:
                raise DataError(f"{where}: each template needs an `instruction`, got {template!r}")
            # a Chinese template outside the zh block still serves Chinese rows
            base["templates"][lang if lang == "zh" else _template_lang(template, where)].append(template)
        for key in ("labels", "defaults"):
            if key in block:
                base[key][lang] = {str(k): str(v) for k, v in (block[key] or {}).items()}
    base.update({k: v for k, v in spec.items() if k not in ("templates", "labels", "defaults", "zh")})


def _empty_task() -> dict:
    return {"columns": [], "templates": {g: [] for g in TEMPLATE_LANGS}, "labels": {g: {} for g in TEMPLATE_LANGS},
            "defaults": {g: {} for g in TEMPLATE_LANGS}}


def load_templates(extra: str | Path | None = None) -> dict:
    """Built-in tasks, merged with a user file: its templates are appended, other keys override."""
    sources = [(BUILTIN, yaml.safe_load(BUILTIN.read_text(encoding="utf-8")))]
    if extra is not None:
        try:
            sources.append((Path(extra), yaml.safe_load(Path(extra).read_text(encoding="utf-8"))))
        except OSError as err:
            raise DataError(f"{extra}: cannot read templates: {err}") from None
        except yaml.YAMLError as err:
            raise DataError(f"{extra}: not valid YAML at {yaml_error_text(err)}") from None
    tasks: dict = {}
    for path, data in sources:
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
            raise DataError(f"{path}: expected `tasks: {{name: {{columns, templates}}}}`")
        for name, spec in data["tasks"].items():
            if not isinstance(spec, dict):
                raise DataError(f"{path}: tasks.{name} must be a mapping with a `templates` list")
            _merge(tasks.setdefault(name, _empty_task()), spec, f"{path}: tasks.{name}")
    for spec in tasks.values():  # English labels/defaults serve Chinese rows when a task has none of its own
        for key in ("labels", "defaults"):
            spec[key]["zh"] = spec[key]["zh"] or spec[key]["en"]
    return tasks


def _row_lang(spec: dict, row: dict, lang: str, fields: list[str] | None, fallbacks: Counter) -> str:
    """The templates' language for this row: --lang, or the script of the row's task columns."""
    if lang == "auto":
        lang = lang_of(" ".join(str(row.get(c, "")) for c in spec["columns"] + (fields or []) if c != "label"))
    if not spec["templates"][lang]:
        fallbacks[lang] += 1
        lang = next(g for g in TEMPLATE_LANGS if spec["templates"][g])
    return lang


def from_task(path: str | Path, out: str | Path, task: str, templates: str | Path | None = None,
              seed: int = 0, labels: list[str] | None = None, *, lang: str = "auto", fields: list[str] | None = None,
              columns: dict[str, str] | None = None, answer: str = "letter", skip_bad: bool = False) -> dict:
    """Render every row of `path` with `task`'s templates into alpaca rows at `out`; returns the report."""
    tasks = load_templates(templates)
    if task not in tasks:
        raise DataError(f"unknown task {task!r}; known: {', '.join(sorted(tasks))} (add one with --templates)")
    if lang not in LANGS or answer not in ANSWER_STYLES:
        raise DataError(f"--lang must be one of {', '.join(LANGS)} and --answer one of {', '.join(ANSWER_STYLES)}")
    spec = tasks[task]
    if not any(spec["templates"].values()):
        raise DataError(f"task {task!r} has no templates")
    if labels:  # e.g. --labels sports,politics for a generic classification file
        spec["labels"] = {g: {**{w: w for w in labels}, **m} for g, m in spec["labels"].items()}
    rng = random.Random(seed)
    langs, fallbacks, empty, rejected = Counter(), Counter(), Counter(), Counter()
    with AtomicJsonl(out) as writer, AtomicJsonl(side_path(out, "rejected")) as rejects:
        for source, row in progress(iter_rows(path), "from-task"):
            row = rename_columns(row, columns or {})
            try:
                use = _row_lang(spec, row, lang, fields, fallbacks)
                writer.write({**render(spec, row, source, rng, use, fields=fields, answer_style=answer, empty=empty),
                              "task": task})
                langs[use] += 1
            except DataError as err:
                if not skip_bad:
                    raise
                rejected[reason_of(err, source)] += 1
                rejects.write({"source": source, "reason": str(err), "row": row})
    return {"rows": writer.count, "task": task, "langs": dict(langs),
            "templates": {g: len(t) for g, t in spec["templates"].items() if t}, "rejected": dict(rejected),
            **({"template_fallback": dict(fallbacks)} if fallbacks else {}),
            **({"empty_fields": dict(empty)} if empty else {}), "out": str(out),
            "rejected_file": str(rejects.path) if rejects.count else None}
