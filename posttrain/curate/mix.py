"""`posttrain data mix mix.yaml --out train.jsonl`: combine sources by weight and cap, deterministic by seed.

    seed: 0
    to: openai                 # output format: every source is converted, so one file holds one format
    sources:
      - path: alpaca_en_demo.json
        cap: 500               # at most 500 distinct rows (chosen at random) ...
        weight: 1.0            # ... each taken weight times: 2.0 up-samples, 0.5 down-samples
      - path: identity.json
        weight: 3.0
        variables: {name: Posty, author: the posttrain team}
        name: identity         # written to each row's `source` column (default: the file's stem)

Semantics match the SFT config's datasets (cap first, then round(weight * rows)). Only two
integers per output row are held in memory; rows are fetched by random access (byte offsets
for JSON lines, memory-mapped Arrow otherwise), so the output is shuffled without loading it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from posttrain.curate.convert import CannotCarry, conversation_to_row, metadata
from posttrain.curate.stream import AtomicJsonl, FileParser, is_json_lines, progress, side_path
from posttrain.data.reading import read_rows, source_of
from posttrain.data.policy import ContentProblem, count_problem
from posttrain.errors import DataError
from posttrain.typed_config import yaml_error_text

SOURCE_KEYS = {"path", "weight", "cap", "variables", "name", "format"}


class RowFile:
    """Random access to one file's rows: (source, row) by 0-based index."""

    def __init__(self, path: Path):
        self.path = path
        if is_json_lines(path):
            offsets, lines = [], []
            with path.open("rb") as f:
                pos = 0
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        offsets.append(pos)
                        lines.append(number)
                    pos += len(line)
            self.offsets, self.lines, self.rows = np.array(offsets, np.int64), np.array(lines, np.int64), None
            self._f = path.open("rb")
        else:
            self.rows = read_rows(path)

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.offsets)

    def get(self, i: int) -> tuple[str, dict]:
        if self.rows is not None:
            return source_of(self.path, i), {k: v for k, v in self.rows[int(i)].items() if v is not None}
        self._f.seek(int(self.offsets[i]))
        source = f"{self.path} line {self.lines[i]}"
        try:
            row = json.loads(self._f.readline())
        except json.JSONDecodeError as err:
            raise DataError(f"{source}: not valid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{source}: expected a JSON object, got {type(row).__name__}")
        return source, row


def load_mix(path: str | Path) -> dict:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as err:
        raise DataError(f"{path}: cannot read mix file: {err}") from None
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML at {yaml_error_text(err)}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("sources"), list) or not spec["sources"]:
        raise DataError(f"{path}: expected `sources:` with a list of {{path, weight, cap}} entries")
    if unknown := set(spec) - {"seed", "to", "sources"}:
        raise DataError(f"{path}: unknown keys {sorted(unknown)}; use seed, to, sources")
    for i, src in enumerate(spec["sources"]):
        if not isinstance(src, dict) or "path" not in src:
            raise DataError(f"{path}: sources[{i}] needs a `path`")
        if unknown := set(src) - SOURCE_KEYS:
            raise DataError(f"{path}: sources[{i}] has unknown keys {sorted(unknown)}; use {sorted(SOURCE_KEYS)}")
        if float(src.get("weight", 1.0)) < 0 or int(src.get("cap", 1)) < 0:
            raise DataError(f"{path}: sources[{i}]: weight and cap must be >= 0")
        file = Path(src["path"])
        if not file.exists() and not file.is_absolute() and (path.parent / file).exists():
            file = path.parent / file  # relative to the current directory first, then to the mix file
        src["path"] = file
    return spec


def choose(n: int, weight: float, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Row indices one source contributes: a random `cap` subset, repeated/sampled to round(weight * size)."""
    subset = rng.permutation(n)[: n if cap is None else min(cap, n)]
    target = int(round(weight * len(subset)))
    if not len(subset):
        return subset
    full, rest = divmod(target, len(subset))
    return np.concatenate([subset] * full + [rng.choice(subset, rest, replace=False)])


def mix(mix_path: str | Path, out: str | Path, seed: int | None = None, strict: bool = False) -> dict:
    spec = load_mix(mix_path)
    seed = int(spec.get("seed", 0) if seed is None else seed)
    to = spec.get("to", "openai")
    rng = np.random.default_rng(seed)
    files = [RowFile(Path(src["path"])) for src in spec["sources"]]
    picks = [choose(len(f), float(s.get("weight", 1.0)), s.get("cap"), rng) for f, s in zip(files, spec["sources"])]
    order = np.concatenate([np.stack([np.full(len(p), i), p], 1) for i, p in enumerate(picks)])
    order = order[rng.permutation(len(order))]  # (N, 2): source number, row index
    parsers = [FileParser(s.get("format", "auto"), s.get("variables")) for s in spec["sources"]]
    taken, lost, rejected = Counter(), Counter(), Counter()
    with AtomicJsonl(out) as writer, AtomicJsonl(side_path(out, "rejected")) as rejects:
        for src_i, row_i in progress(order, "mix", total=len(order)):
            src = spec["sources"][src_i]
            name = src.get("name") or Path(src["path"]).stem
            source, row = files[src_i].get(row_i)
            try:
                conv = parsers[src_i](row, source)
                writer.write(conversation_to_row(conv, to, lost, {**metadata(row), "source": name}))
                taken[name] += 1
            except CannotCarry as err:
                rejected[str(err)] += 1
                rejects.write({"source": source, "reason": str(err), "row": row})
            except ContentProblem as problem:  # data/policy.py: rejected by reason, or fatal when strict
                count_problem(rejected, problem, strict)
                rejects.write({"source": source, "reason": str(problem), "row": row})
    return {"rows": writer.count, "per_source": dict(taken), "available": {Path(s["path"]).stem: len(f)
            for s, f in zip(spec["sources"], files)}, "rejected": dict(rejected), "lost": dict(lost),
            "seed": seed, "out": str(out)}
