"""`posttrain data split`: train/val/test by row or grouped by a key, so no group spans two splits.

Each row (or group key) is hashed with the seed to a number in [0, 1): below `val` goes to
val, below `val + test` to test, the rest to train. Hashing needs no memory and no second
pass, and the same seed gives the same split on any machine; fractions are exact in
expectation (over groups, not rows, when grouped).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from posttrain.curate.stream import AtomicJsonl, iter_rows, progress
from posttrain.errors import DataError

SPLITS = ("train", "val", "test")


def unit_hash(seed: int, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split(path: str | Path, out_dir: str | Path, *, val: float = 0.05, test: float = 0.0,
          by: str | None = None, seed: int = 0) -> dict:
    if val < 0 or test < 0 or val + test >= 1:
        raise DataError(f"--val and --test must be >= 0 and sum below 1, got {val} and {test}")
    out_dir = Path(out_dir)
    names = [s for s in SPLITS if s == "train" or {"val": val, "test": test}[s] > 0]
    counts, groups = Counter(), {s: set() for s in names}
    writers = {s: AtomicJsonl(out_dir / f"{s}.jsonl") for s in names}
    for w in writers.values():
        w.__enter__()
    try:
        for n, (source, row) in enumerate(progress(iter_rows(path), "split")):
            if by is None:
                key = str(n)
            elif by not in row or row[by] is None:
                raise DataError(f"{source}: field '{by}' (the --by group key) is missing")
            else:
                key = json.dumps(row[by], sort_keys=True)
            u = unit_hash(seed, key)
            name = "val" if u < val else "test" if u < val + test else "train"
            writers[name].write(row)
            counts[name] += 1
            if by is not None and len(groups[name]) < 1_000_000:  # group counts for the report, bounded
                groups[name].add(key)
    except BaseException as err:
        for w in writers.values():
            w.__exit__(type(err), err, None)
        raise
    for w in writers.values():
        w.__exit__(None, None, None)
    report = {"rows": dict(counts), "out_dir": str(out_dir), "seed": seed}
    if by is not None:
        report["groups"] = {s: len(g) for s, g in groups.items()}
    return report
