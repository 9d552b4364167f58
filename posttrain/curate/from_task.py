"""`posttrain data from-task`: labelled NLP task rows -> alpaca instruction rows via templates.

Templates (posttrain/resources/task_templates.yaml, extendable with --templates) give several
phrasings per task type; one is sampled per row from a seeded generator, so the same seed
always gives the same file while instructions still vary (the FLAN recipe).
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from posttrain.curate.stream import AtomicJsonl, iter_rows, progress
from posttrain.errors import DataError
from posttrain.typed_config import yaml_error_text

BUILTIN = Path(__file__).resolve().parents[1] / "resources" / "task_templates.yaml"


def load_templates(extra: str | Path | None = None) -> dict:
    """Built-in tasks, merged with a user file: its templates are appended, other keys override."""
    tasks = yaml.safe_load(BUILTIN.read_text())["tasks"]
    if extra is None:
        return tasks
    try:
        user = yaml.safe_load(Path(extra).read_text())
    except OSError as err:
        raise DataError(f"{extra}: cannot read templates: {err}") from None
    except yaml.YAMLError as err:
        raise DataError(f"{extra}: not valid YAML at {yaml_error_text(err)}") from None
    if not isinstance(user, dict) or not isinstance(user.get("tasks"), dict):
        raise DataError(f"{extra}: expected `tasks: {{name: {{columns, templates}}}}`")
    for name, spec in user["tasks"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("templates", []), list):
            raise DataError(f"{extra}: tasks.{name} must be a mapping with a `templates` list")
        base = tasks.setdefault(name, {"columns": [], "templates": []})
        base["templates"] = base.get("templates", []) + spec.get("templates", [])
        base.update({k: v for k, v in spec.items() if k != "templates"})
    return tasks


class _Fields(dict):
    def __init__(self, values: dict, source: str):
        super().__init__(values)
        self.source = source

    def __missing__(self, key):
        raise DataError(f"{self.source}: field '{key}' is missing (the template uses {{{key}}})")


def render(spec: dict, row: dict, source: str, rng: random.Random) -> dict:
    """One task row -> {instruction, input, output} with a randomly chosen template."""
    for col in spec.get("columns", []):
        if row.get(col) is None or row.get(col) == "":
            raise DataError(f"{source}: field '{col}' is missing/empty")
    labels = {str(k): str(v) for k, v in (spec.get("labels") or {}).items()}
    values = {**spec.get("defaults", {}), **{k: str(v) for k, v in row.items() if v is not None}}
    if "label" in row:
        label = str(row["label"])
        if labels and label not in labels:
            raise DataError(f"{source}: field 'label' has value {label!r}; known labels: {sorted(labels)}")
        values["label"] = labels.get(label, label)
    words = list(dict.fromkeys(labels.values()))
    values.setdefault("options", ", ".join(f'"{w}"' for w in words) if words else "")
    template = rng.choice(spec["templates"])
    fields = _Fields(values, source)
    return {key: template.get(key, "").format_map(fields) for key in ("instruction", "input", "output")}


def from_task(path: str | Path, out: str | Path, task: str, templates: str | Path | None = None,
              seed: int = 0, labels: list[str] | None = None) -> dict:
    tasks = load_templates(templates)
    if task not in tasks:
        raise DataError(f"unknown task {task!r}; known: {', '.join(sorted(tasks))} (add one with --templates)")
    spec = tasks[task]
    if not spec.get("templates"):
        raise DataError(f"task {task!r} has no templates")
    if labels:  # e.g. --labels sports,politics for a generic classification file
        spec = {**spec, "labels": {**{w: w for w in labels}, **(spec.get("labels") or {})}}
    rng = random.Random(seed)
    with AtomicJsonl(out) as writer:
        for source, row in progress(iter_rows(path), "from-task"):
            writer.write({**render(spec, row, source, rng), "task": task})
    return {"rows": writer.count, "task": task, "templates": len(spec["templates"]), "out": str(out)}
