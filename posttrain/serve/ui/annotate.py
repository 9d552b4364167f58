"""Ranking annotation: prompts with K candidate responses -> labels -> ranked, pairwise and SFT data.

Input rows: {"prompt": str, "responses": [str, ...]} (optional "id", and "models": who wrote each
response, as the UI's candidate generation records it), read by data.reading like any dataset; a
file that grows (candidates still being generated) is read again. Every label is appended to
`<task>.labels.jsonl` the moment it is given (the last label of an item wins), so a refresh or a
crash loses nothing. Items being shown to one annotator are held
for a few minutes so several annotators can work at once without labelling the same item.
The export also writes `<task>.sft.jsonl`: per ranked item, the polished (edited) answer, or the
top-ranked one with sft="top", as a conversation `stage: sft` trains on.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from posttrain.data.reading import read_rows, source_of
from posttrain.errors import DataError

CLAIM_SECONDS = 300  # how long an item shown to one annotator is kept from the others
STATUSES = ("ranked", "skipped", "flagged")
SFT_CHOICES = ("polished", "top")  # which answer of a ranked item the .sft.jsonl export keeps


@dataclass
class Item:
    id: str
    prompt: str
    responses: list[str]
    models: list[str] | None = None  # the model behind each response, when known (never shown to annotators)


def load_items(path: str | Path) -> list[Item]:
    items = []
    for i, row in enumerate(read_rows(path)):
        prompt, responses = row.get("prompt"), row.get("responses")
        if not isinstance(prompt, str) or not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{source_of(path, i)}: needs 'prompt' (text) and 'responses' (a list of 2 or more)")
        models = row.get("models")
        models = [str(m) for m in models] if isinstance(models, list) and len(models) == len(responses) else None
        items.append(Item(str(row.get("id") or i), prompt, [str(r) for r in responses], models))
    return items


class AnnotationTask:
    """One prompt file under annotation; labels live beside it in the UI's work folder."""

    def __init__(self, source: str | Path, workdir: str | Path):
        self.source = Path(source)
        self.stamp: tuple[int, int] | None = None
        self.refresh()
        key = hashlib.sha1(str(self.source.resolve()).encode()).hexdigest()[:8]
        self.name = f"{self.source.stem}-{key}"
        self.dir = Path(workdir) / "annotations"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.labels_path = self.dir / f"{self.name}.labels.jsonl"
        self.lock = threading.Lock()
        self.claims: dict[str, tuple[str, float]] = {}  # item id -> (annotator, until)

    def refresh(self) -> None:
        """(Re)read the items when the file changed since the last read."""
        stat = self.source.stat() if self.source.is_file() else None
        stamp = (stat.st_mtime_ns, stat.st_size) if stat else None
        if stamp is None or stamp != self.stamp:
            self.items = load_items(self.source)
            self.by_id = {item.id: item for item in self.items}
            self.stamp = stamp

    def labels(self) -> dict[str, dict]:
        """The latest label of each item (the file is append-only)."""
        latest: dict[str, dict] = {}
        if self.labels_path.is_file():
            for line in self.labels_path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    label = json.loads(line)
                    latest[label["item"]] = label
        return latest

    def next_item(self, annotator: str) -> tuple[Item | None, dict]:
        """The first item nobody labelled and nobody else holds; claims it for `annotator`."""
        with self.lock:
            self.refresh()
            done = self.labels()
            now = time.time()
            for item in self.items:
                holder, until = self.claims.get(item.id, (annotator, 0.0))
                if item.id in done or (holder != annotator and until > now):
                    continue
                self.claims[item.id] = (annotator, now + CLAIM_SECONDS)
                return item, self.progress(done)
            return None, self.progress(done)

    def progress(self, done: dict | None = None) -> dict:
        done = self.labels() if done is None else done
        return {"done": len(done), "total": len(self.items),
                **{s: sum(1 for lab in done.values() if lab["status"] == s) for s in STATUSES}}

    def label(self, item_id: str, annotator: str, status: str, ranking: list[int] | None = None,
              edits: dict[str, str] | None = None) -> dict:
        """Record one label. ranking: the rank (1 = best) of each response, in response order."""
        item = self.by_id.get(item_id)
        if item is None:
            raise DataError(f"unknown item {item_id!r}")
        if status not in STATUSES:
            raise DataError(f"status must be one of {', '.join(STATUSES)}")
        if not annotator.strip():
            raise DataError("give an annotator name: every label records who made it")
        k = len(item.responses)
        ranks_ok = isinstance(ranking, list) and all(type(r) is int for r in ranking)
        if status == "ranked" and not (ranks_ok and sorted(ranking) == list(range(1, k + 1))):
            raise DataError(f"ranking must give each of the {k} responses a distinct rank 1..{k}")
        edits = edits or {}
        if not isinstance(edits, dict) or not all(str(i).isdigit() and int(i) < k and isinstance(text, str)
                                                  for i, text in edits.items()):
            raise DataError(f"edits must map response numbers 0..{k - 1} to their edited text")
        responses = list(item.responses)
        polished = {int(i): text for i, text in edits.items() if text != responses[int(i)]}
        for i, text in polished.items():
            responses[i] = text  # the polished text is what later training sees
        label = {"item": item.id, "prompt": item.prompt, "responses": responses, "ranking": ranking,
                 "status": status, "annotator": annotator.strip(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "edited": sorted(polished), "originals": {str(i): item.responses[i] for i in polished}}
        with self.lock:
            with self.labels_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(label, ensure_ascii=False) + "\n")
                f.flush()
            self.claims.pop(item.id, None)
        return label

    def export(self, sft: str = "polished") -> dict:
        """Ranked lists (best first), every pairwise preference implied by them, and SFT conversations, as JSONL.

        sft="polished": per ranked item, its best-ranked answer that the annotator edited (items without an
        edit give none); sft="top": per ranked item, its top-ranked answer (edited or not)."""
        if sft not in SFT_CHOICES:
            raise DataError(f"sft must be one of {', '.join(SFT_CHOICES)}")
        ranked = [lab for lab in self.labels().values() if lab["status"] == "ranked"]
        paths = {kind: self.dir / f"{self.name}.{kind}.jsonl" for kind in ("ranked", "pairwise", "sft")}
        n_pairs = n_sft = 0
        with paths["ranked"].open("w", encoding="utf-8") as rf, paths["pairwise"].open("w", encoding="utf-8") as pf, \
                paths["sft"].open("w", encoding="utf-8") as sf:
            for lab in ranked:
                order = sorted(range(len(lab["responses"])), key=lambda i: lab["ranking"][i])
                best_first = [lab["responses"][i] for i in order]
                meta = {"id": lab["item"], "annotator": lab["annotator"]}
                item = self.by_id.get(lab["item"])
                models = [item.models[i] for i in order] if item is not None and item.models else None
                if models:
                    meta["models"] = models  # best first, like responses
                # `ranks` (0 = best) makes the file the ranked-list layout the rm and dpo stages read
                row = {"prompt": lab["prompt"], "responses": best_first, "ranks": list(range(len(best_first)))}
                rf.write(json.dumps(row | meta, ensure_ascii=False) + "\n")
                for better, worse in combinations(best_first, 2):
                    pf.write(json.dumps({"prompt": lab["prompt"], "chosen": better, "rejected": worse, **meta},
                                        ensure_ascii=False) + "\n")
                    n_pairs += 1
                if (conv := _sft_row(lab, order, sft, models)) is not None:
                    sf.write(json.dumps(conv, ensure_ascii=False) + "\n")
                    n_sft += 1
        return {"ranked": str(paths["ranked"]), "pairwise": str(paths["pairwise"]), "sft": str(paths["sft"]),
                "items": len(ranked), "pairs": n_pairs, "sft_rows": n_sft, "sft_mode": sft}


def _sft_row(lab: dict, order: list[int], sft: str, models: list[str] | None) -> dict | None:
    """One conversation (the `stage: sft` layout) for a ranked label, or None (sft="polished", no edit)."""
    edited = set(lab.get("edited") or [])
    rank = next((r for r, i in enumerate(order) if sft == "top" or i in edited), None)
    if rank is None:
        return None
    i = order[rank]
    row = {"messages": [{"role": "user", "content": lab["prompt"]},
                        {"role": "assistant", "content": lab["responses"][i]}],
           "id": lab["item"], "annotator": lab["annotator"], "rank": rank, "polished": i in edited}
    return row | ({"model": models[rank]} if models else {})
