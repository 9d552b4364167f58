"""Unpaired preference data for KTO: one response per row, labelled desirable (true) or undesirable (false).

Layouts: a conversation (`messages`, `conversations`, ...; LLaMA-Factory's kto_en_demo) whose final
assistant reply is the labelled response, and TRL's unpaired `{"prompt", "completion", "label"}` (each a
string or a list of messages). Under the one data policy (data/policy.py) a label that is not a bool is
structural (fatal); a blank turn or a conversation with no final reply is a content problem (dropped and
counted, fatal under data.strict). Every sample also carries a mismatched sequence, its prompt with another
row's response (a seeded cycle over the data), from which KTO estimates its KL reference point.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from posttrain.data.formats import refuse_media, rename_columns, role_map, row_to_conversation
from posttrain.data.row_context import RowContext
from posttrain.data.policy import ContentProblem, count_problem, drop_sample
from posttrain.data.preference import _messages, _response
from posttrain.data.reading import read_rows, source_of
from posttrain.data.holdout import split_off
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


def is_kto_row(row: Mapping) -> bool:
    """A conversation or prompt + completion row with a `label` column (any value: a wrong type is then a
    field error)."""
    return "label" in row and any(k in row for k in ("messages", "conversations", "completion"))


def row_to_kto(row: Mapping, *, source: str, columns: Mapping[str, str] | None = None,
               role_tags: Mapping[str, str] | None = None,
               variables: Mapping[str, str] | None = None) -> tuple[Conversation, bool]:
    """(the conversation, whether its final reply is desirable) from either layout."""
    row = rename_columns(row, columns or {})
    label = row.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{source}: field 'label' must be true or false (is the final reply desirable?), "
                        f"got {label!r:.40}")
    if row.get("completion") is not None:
        ctx, tags = RowContext(source, columns or {}), role_map(role_tags)
        refuse_media(row, ctx)
        if row.get("prompt") is None:
            raise DataError(f"{source}: field 'prompt' is missing (a completion row needs its prompt)")
        messages = [*_messages(row["prompt"], ctx, "prompt", tags), _response(row["completion"], ctx, "completion",
                                                                                 tags)]
        return Conversation(messages=messages, source=source), label
    conv = row_to_conversation({k: v for k, v in row.items() if k != "label"}, "auto", source=source,
                               role_tags=role_tags, variables=variables)
    if len(conv.messages) < 2 or conv.messages[-1].role != "assistant":
        raise ContentProblem("no_final_reply", f"{source}: the conversation does not end with an assistant reply "
                                               "for 'label' to judge")
    return conv, label


def _encode(prompt: list[Message], response: Message, tokenizer, max_length, system, source) -> tuple[list, list]:
    (enc,) = encode_conversation(Conversation(messages=[*prompt, response], source=source), tokenizer, mask="last",
                                 max_length=max_length, system=system)
    return enc.input_ids, enc.weights


def encode_kto(recs: list[KTORecord], tokenizer, max_length, system, seed: int, drops: Counter,
               strict: bool = False) -> list[KTOSample]:
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
            drop_sample(drops, drop, rec.source, strict)
            continue
        out.append(KTOSample(ids, weights, kl_ids, kl_weights, rec.desirable))
    return out


def read_kto(ds_cfg, data_cfg, drops: Counter) -> list[KTORecord]:
    rows = read_rows(ds_cfg.path)
    limit = len(rows) if ds_cfg.max_samples is None else min(ds_cfg.max_samples, len(rows))
    out = []
    for i in range(limit):
        source = source_of(ds_cfg.path, i)
        try:
            conv, label = row_to_kto(rows[i], source=source, columns=ds_cfg.columns, role_tags=ds_cfg.role_tags,
                                     variables=data_cfg.variables)
        except ContentProblem as problem:
            count_problem(drops, problem, data_cfg.strict)
            continue
        out.append(KTORecord(list(conv.messages[:-1]), conv.messages[-1], label, source))
    return out


def build_kto_data(data_cfg, template_cfg, tokenizer, seed: int) -> KTOData:
    """Read, hold out (val_size or eval_datasets), and encode KTO files."""
    apply_template(tokenizer, template_cfg.name)
    drops: Counter = Counter()
    train = [r for ds in data_cfg.datasets for r in read_kto(ds, data_cfg, drops)]
    evals = [r for ds in data_cfg.eval_datasets for r in read_kto(ds, data_cfg, drops)]
    if not evals and data_cfg.val_size > 0:
        train, evals = split_off(train, data_cfg.val_size, seed, "KTO")
    args = (tokenizer, data_cfg.max_length, template_cfg.system, seed, drops, data_cfg.strict)
    train_s, eval_s = encode_kto(train, *args), encode_kto(evals, *args)
    if not train_s:
        raise PosttrainError(f"no KTO samples left ({len(train)} rows; dropped {dict(drops) or 'none'})")
    return KTOData(train_s, eval_s or None, dict(drops))
