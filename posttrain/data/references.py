"""A file's reference responses as token ids, rendered as a run renders them: what reward
normalisation (`rm.normalize_data`, `posttrain score --normalize`) averages the reward model over.
"""

from __future__ import annotations

from collections import Counter

from posttrain.config import DatasetConfig
from posttrain.data.formats import detect_format, row_to_conversation
from posttrain.data.preference import encode_all, read_preferences
from posttrain.data.reading import read_rows, source_of
from posttrain.errors import PosttrainError
from posttrain.templates.render import DropSample, encode_conversation


def reference_ids(path: str, tokenizer, cfg, drops: Counter) -> list[list[int]]:
    """Token ids of a file's reference responses, rendered as the run renders them.

    A preference file gives each prompt's chosen (top-ranked) responses; a conversation file
    (alpaca, sharegpt, openai) gives each conversation ending in an assistant reply.
    """
    rows = read_rows(path)
    length, system = cfg.data.max_length, cfg.template.system
    if {"chosen", "responses"} & set(rows.column_names):
        samples = encode_all(read_preferences(DatasetConfig(path=str(path)), cfg.data.variables), tokenizer,
                             length, system, drops)
        out = [ids for s in samples for k, ids in enumerate(s.input_ids) if k not in {w for _, w in s.pairs}]
    else:
        fmt, out = detect_format(rows.column_names, str(path)), []
        for i, row in enumerate(rows):
            conv = row_to_conversation(row, fmt, source=source_of(path, i), variables=cfg.data.variables)
            if not conv.messages or conv.messages[-1].role != "assistant":
                drops["no_final_reply"] += 1
                continue
            try:
                out.append(encode_conversation(conv, tokenizer, mask="last", max_length=length, system=system)[0]
                           .input_ids)
            except DropSample as drop:
                drops[drop.reason] += 1
    if not out:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(drops.items())) or "none"
        raise PosttrainError(f"{path}: no reference responses to normalise rewards on (dropped {counts})")
    return out
