"""Unpaired preference data for KTO: one response per row, labelled desirable (true) or undesirable (false).

Layouts: `{"messages": [...], "label": bool}` (LLaMA-Factory's kto_en_demo: the last assistant turn is
the response, the turns before it the prompt) and TRL's unpaired `{"prompt", "completion", "label"}`
(each a string or a list of messages). Every sample also carries a mismatched sequence, its prompt with
another row's response (a seeded cycle over the data), from which KTO estimates its KL reference point.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from posttrain.data.formats import RowContext, refuse_media, rename_columns, role_map, row_to_conversation
from posttrain.data.preference import prompt_messages, response_message
from posttrain.data.reading import read_rows, source_of
from posttrain.errors import DataError, PosttrainError
from posttrain.records import Conversation, Message
from posttrain.templates.render import DropSample, apply_template, encode_conversation


@dataclass
class KTORecord:
    prompt: list[Message]
    response: Message
    desirable: bool
    source: str = ""


@dataclass
class KTOSample:
    input_ids: list[int]  # prompt + its response, rendered by the chat template
    weights: list[float]  # 1 on the response tokens (mask "last"), else 0
    kl_input_ids: list[int]  # the same prompt + another sample's response: the KL reference point's input
    kl_weights: list[float]
    desirable: bool


@dataclass
class KTOData:
    train: list[KTOSample]
    eval: list[KTOSample] | None
    drops: dict[str, int] = field(default_factory=dict)


def row_to_kto(row: Mapping, *, source: str, columns: Mapping[str, str] | None = None,
               role_tags: Mapping[str, str] | None = None) -> KTORecord:
    """One file row (messages + label, or prompt + completion + label) -> KTORecord."""
    row = rename_columns(row, columns or {})
    ctx, tags = RowContext(source, columns or {}), role_map(role_tags)
    refuse_media(row, ctx)
    label = row.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{source}: field label must be true (desirable) or false (undesirable), got {label!r}")
    if row.get("completion") is not None:
        if row.get("prompt") is None:
            raise DataError(f"{source}: a completion row needs a prompt")
        return KTORecord(prompt_messages(row["prompt"], ctx, "prompt", tags),
                         response_message(row["completion"], ctx, "completion", tags), label, source)
    fields = {k: v for k, v in row.items() if k != "label" and v is not None}
    messages = list(row_to_conversation(fields, "auto", source=source, role_tags=role_tags).messages)
    if len(messages) < 2 or messages[-1].role != "assistant":
        raise DataError(f"{source}: a KTO row needs a prompt and a final assistant reply (messages + label, or "
                        f"prompt + completion + label); got columns {sorted(fields)}")
    return KTORecord(messages[:-1], messages[-1], label, source)


def _encode(prompt: list[Message], response: Message, tokenizer, max_length, system, source) -> tuple[list, list]:
    (enc,) = encode_conversation(Conversation(messages=[*prompt, response], source=source), tokenizer, mask="last",
                                 max_length=max_length, system=system)
    return enc.input_ids, enc.weights


def encode_kto(recs: list[KTORecord], tokenizer, max_length, system, seed: int, drops: Counter) -> list[KTOSample]:
    """Tokenize each record and its mismatched pair: record order[k] takes the response of order[k + 1]."""
    order = np.random.default_rng([seed, 5]).permutation(len(recs)).tolist() if recs else []
    partner = {i: order[(k + 1) % len(order)] for k, i in enumerate(order)}
    out = []
    for i, rec in enumerate(recs):
        try:
            ids, weights = _encode(rec.prompt, rec.response, tokenizer, max_length, system, rec.source)
            kl_ids, kl_weights = _encode(rec.prompt, recs[partner[i]].response, tokenizer, max_length, system,
                                         rec.source)
        except DropSample as drop:
            drops[drop.reason] += 1
            continue
        out.append(KTOSample(ids, weights, kl_ids, kl_weights, rec.desirable))
    return out


def read_kto(ds_cfg) -> list[KTORecord]:
    rows = read_rows(ds_cfg.path)
    limit = len(rows) if ds_cfg.max_samples is None else min(ds_cfg.max_samples, len(rows))
    return [row_to_kto(rows[i], source=source_of(ds_cfg.path, i), columns=ds_cfg.columns,
                       role_tags=ds_cfg.role_tags) for i in range(limit)]


def build_kto_data(data_cfg, template_cfg, tokenizer, seed: int) -> KTOData:
    """Read, hold out (val_size or eval_datasets), and encode KTO files."""
    apply_template(tokenizer, template_cfg.name)
    train = [r for ds in data_cfg.datasets for r in read_kto(ds)]
    evals = [r for ds in data_cfg.eval_datasets for r in read_kto(ds)]
    if not evals and data_cfg.val_size > 0:
        n_val = int(data_cfg.val_size) if data_cfg.val_size >= 1 else max(1, round(data_cfg.val_size * len(train)))
        if n_val >= len(train):
            raise PosttrainError(f"data.val_size={data_cfg.val_size} leaves no KTO rows to train on")
        held = set(np.random.default_rng([seed, 3]).choice(len(train), n_val, replace=False).tolist())
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    drops: Counter = Counter()
    train_s = encode_kto(train, tokenizer, data_cfg.max_length, template_cfg.system, seed, drops)
    eval_s = encode_kto(evals, tokenizer, data_cfg.max_length, template_cfg.system, seed, drops)
    if not train_s:
        raise PosttrainError(f"no KTO samples left ({len(train)} rows; dropped {dict(drops) or 'none'})")
    return KTOData(train_s, eval_s or None, dict(drops))
