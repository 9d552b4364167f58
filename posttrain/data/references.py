"""A file's reference responses as token ids, rendered as a run renders them: what reward
normalisation (`rm.normalize_data`, `posttrain score --normalize`) averages the reward model over.
"""

from __future__ import annotations

from collections import Counter

from posttrain.data.config import DataConfig, DatasetConfig
from posttrain.data.formats import detect_format, row_to_conversation
from posttrain.data.policy import ContentProblem, count_problem, drop_or_raise, drop_sample
from posttrain.data.preference import encode_all, read_preferences
from posttrain.data.reading import read_rows, source_of
from posttrain.errors import PosttrainError
from posttrain.templates.render import DropSample, encode_conversation


def reference_ids(path: str, tokenizer, data_cfg: DataConfig, system: str | None, drops: Counter,
                  strict: bool = False) -> list[list[int]]:
    """Token ids of a file's reference responses, rendered as the run renders them (its data.max_length,
    data.variables and system prompt).

    A preference file gives each prompt's chosen (top-ranked) responses; a conversation file
    (alpaca, sharegpt, openai) gives each conversation ending in an assistant reply. Rows with
    content problems are counted in `drops`, or fatal with `strict` (data/policy.py).
    """
    rows = read_rows(path)
    length, variables = data_cfg.max_length, data_cfg.variables
    if {"chosen", "responses"} & set(rows.column_names):
        samples = encode_all(read_preferences(DatasetConfig(path=str(path)), variables, drops, strict),
                             tokenizer, length, system, drops, strict)
        out = [ids for s in samples for k, ids in enumerate(s.input_ids) if k not in {w for _, w in s.pairs}]
    else:
        fmt, out = detect_format(rows.column_names, str(path)), []
        for i, row in enumerate(rows):
            source = source_of(path, i)
            try:
                conv = row_to_conversation(row, fmt, source=source, variables=variables)
                if not conv.messages or conv.messages[-1].role != "assistant":
                    drop_or_raise(drops, "no_final_reply", source, strict)
                    continue
                out.append(encode_conversation(conv, tokenizer, mask="last", max_length=length, system=system)[0]
                           .input_ids)
            except ContentProblem as problem:
                count_problem(drops, problem, strict)
            except DropSample as drop:
                drop_sample(drops, drop, source, strict)
    if not out:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(drops.items())) or "none"
        raise PosttrainError(f"{path}: no reference responses to normalise rewards on (dropped {counts})")
    return out
