"""Write examples/data/prefs_demo_en_zh.jsonl: the LLaMA-Factory DPO demo rows that fit the RM recipe's length.

    python scripts/make_demo_prefs_subset.py --assets ../shared/assets [--max-length 384]

Rows of dpo_en_demo.json and dpo_zh_demo.json (hiyouga/LLaMA-Factory @ ff6d4d12 data/) are copied
unchanged, in order, when every response renders within --max-length tokens with the SmolLM2
tokenizer (posttrain's own rendering; longer multi-turn rows keep only their latest exchanges, as in
training). Licence: see examples/data/LICENSE-DATA.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from posttrain.data.config import DatasetConfig
from posttrain.data.preference import encode_preference, read_preferences
from posttrain.templates.render import DropSample

OUT = Path(__file__).resolve().parents[1] / "examples" / "data" / "prefs_demo_en_zh.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", required=True, type=Path, help="folder with data/llamafactory and tokenizers/")
    ap.add_argument("--max-length", type=int, default=384)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.assets / "tokenizers" / "smollm2-135m-instruct")
    kept = []
    for name in ("dpo_en_demo", "dpo_zh_demo"):
        path = args.assets / "data" / "llamafactory" / f"{name}.json"
        rows = json.loads(path.read_text(encoding="utf-8"))
        for row, rec in zip(rows, read_preferences(DatasetConfig(path=str(path))), strict=True):
            try:
                encode_preference(rec, tok, max_length=args.max_length, system=None)
            except DropSample:
                continue
            kept.append(row)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    print(f"{OUT}: {len(kept)} rows")


if __name__ == "__main__":
    main()
