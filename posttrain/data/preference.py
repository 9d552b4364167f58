"""Preference files -> RankedResponses -> token ids, for the reward-model and DPO stages.

Layouts (auto-detected per row):
- explicit prompt: `prompt` + `chosen` + `rejected`, each a string or a message list;
- implicit prompt: `chosen` + `rejected` full conversations; their shared prefix is the prompt;
- hh-rlhf: `chosen` + `rejected` strings, each a whole "\n\nHuman: ... \n\nAssistant: ..." transcript
  (data/transcripts.py): the shared turns are the prompt, the final Assistant turns the responses;
- sharegpt: `conversations` (the prompt turns) + `chosen` + `rejected` turns ({from, value});
- ranked: `prompt` + `responses` (K = 2..9 strings or messages) + `ranks` (0 = best, ties allowed).
Optional `margin` (pairs). Message lists go through the SFT parsers in data.formats, so roles,
role_tags and errors behave the same; errors name file, line and field. Content problems (an empty
response, prompts that differ, chosen == rejected, too long) are dropped and counted by reason, or
fatal under data.strict (data/policy.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from posttrain.data.formats import (EMPTY_RESPONSE, RowContext, fill_variables, parse_openai, parse_sharegpt,
                                    refuse_media, rename_columns, role_map)
from posttrain.data.policy import ContentProblem, count_problem, drop_sample
from posttrain.data.reading import read_rows, source_of
from posttrain.data.transcripts import transcript_pair
from posttrain.records import Conversation, Message, PreferencePair, RankedResponses
from posttrain.errors import DataError, PosttrainError
from posttrain.templates.render import DropSample, apply_template, encode_conversation

MAX_RANKED = 9


class _Field(RowContext):
    """A RowContext whose errors name our field (`chosen[1].role`) where the reused parser says `messages[1]`."""

    def __init__(self, ctx: RowContext, name: str, inner: str):
        super().__init__(ctx.source, ctx.columns)
        self.name, self.inner = name, inner

    def fail(self, field: str, problem: str) -> DataError:
        return super().fail(self.name + field[len(self.inner):] if field.startswith(self.inner) else field, problem)


def _messages(value, ctx: RowContext, name: str, tags) -> list[Message]:
    """A string (one message of `default_role`) or an OpenAI message list."""
    if isinstance(value, str):
        return [Message("user", ctx.text(value, name))]
    return parse_openai({"messages": value}, _Field(ctx, name, "messages"), tags).messages


def _response(value, ctx: RowContext, name: str, tags, sharegpt: bool = False) -> Message:
    """One assistant response: a string, a {from, value} / {role, content} turn, or a one-turn list."""
    if isinstance(value, str):
        return Message("assistant", ctx.text(value, name, empty=EMPTY_RESPONSE))
    if not isinstance(value, (list, dict)):
        raise ctx.fail(name, f"must be a string or an assistant turn, got {type(value).__name__}: {value!r:.60}")
    turns = value if isinstance(value, list) else [value]
    if sharegpt:
        msgs = parse_sharegpt({"conversations": turns}, _Field(ctx, name, "conversations"), tags).messages
    else:
        msgs = parse_openai({"messages": turns}, _Field(ctx, name, "messages"), tags).messages
    if len(msgs) != 1 or msgs[0].role != "assistant":
        raise ctx.fail(name, "must be one assistant response (a string or a single assistant turn)")
    return msgs[0]


def _split_implicit(chosen: list[Message], rejected: list[Message], ctx: RowContext) -> tuple[list, Message, Message]:
    """The shared leading messages are the prompt; each side must then add one assistant message."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1].role != "assistant":
            raise ctx.problem("no_final_reply", name, "does not end with an assistant message")
        if len(msgs) != n + 1:
            raise ctx.problem("prefix_differs", name, f"must equal the other side up to its final assistant turn "
                              f"(shared prefix: {n} messages); only the last assistant message may differ")
    return chosen[:n], chosen[-1], rejected[-1]


def _margin(value, ctx: RowContext) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.fail("margin", f"must be a number, got {value!r}")
    return float(value)


def _ranked(row: Mapping, ctx: RowContext, tags) -> RankedResponses:
    responses = ctx.items(row.get("responses"), "responses")
    ranks = row.get("ranks")
    if not 2 <= len(responses) <= MAX_RANKED:
        raise ctx.fail("responses", f"must hold 2..{MAX_RANKED} responses, got {len(responses)}")
    if (not isinstance(ranks, list) or len(ranks) != len(responses)
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)):
        raise ctx.fail("ranks", f"must be a list of {len(responses)} integers (0 = best, ties allowed), got {ranks!r}")
    prompt = _messages(row.get("prompt"), ctx, "prompt", tags)
    out = [_response(r, ctx, f"responses[{i}]", tags) for i, r in enumerate(responses)]
    return RankedResponses(prompt, out, list(ranks), 0.0, ctx.source)


def row_to_preference(row: Mapping, *, source: str, columns: Mapping[str, str] | None = None,
                      role_tags: Mapping[str, str] | None = None,
                      variables: Mapping[str, str] | None = None) -> RankedResponses:
    """One file row in any supported layout -> RankedResponses (a pair is K = 2)."""
    columns = columns or {}
    row = rename_columns(row, columns)
    ctx, tags = RowContext(source, columns), role_map(role_tags)
    refuse_media(row, ctx)
    if row.get("responses") is not None:
        rec = _ranked(row, ctx, tags)
    elif row.get("chosen") is None or row.get("rejected") is None:
        raise DataError(f"{source}: not a preference row: expected chosen + rejected (with prompt or "
                        f"conversations, or full conversations), or prompt + responses + ranks; got "
                        f"columns {sorted(k for k, v in row.items() if v is not None)}")
    elif row.get("conversations") is not None:
        prompt = parse_sharegpt(row, ctx, tags).messages
        rec = PreferencePair(prompt, _response(row["chosen"], ctx, "chosen", tags, sharegpt=True),
                             _response(row["rejected"], ctx, "rejected", tags, sharegpt=True))
    elif row.get("prompt") is not None:
        rec = PreferencePair(_messages(row["prompt"], ctx, "prompt", tags),
                             _response(row["chosen"], ctx, "chosen", tags),
                             _response(row["rejected"], ctx, "rejected", tags))
    elif isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
        rec = PreferencePair(*transcript_pair(row["chosen"], row["rejected"], ctx))
    else:
        rec = PreferencePair(*_split_implicit(_messages(row["chosen"], ctx, "chosen", tags),
                                              _messages(row["rejected"], ctx, "rejected", tags), ctx))
    rec.margin = _margin(row.get("margin"), ctx)
    rec.source = source
    if variables:
        for msg in rec.prompt + rec.responses:
            msg.content = fill_variables(msg.content, variables)
    return rec


# ---------------------------------------------------------------- tokenized samples


@dataclass
class PrefSample:
    """One prompt's K tokenized responses and the (better, worse) pairs among them."""

    input_ids: list[list[int]]  # K rows: prompt + response, rendered by the chat template
    weights: list[list[float]]  # K rows: 1 on the response tokens (mask "last"), else 0
    pairs: list[tuple[int, int]]
    margin: float = 0.0
    ref_logps: list[float] | None = None  # reference log-prob per response, when precomputed
    source: str = ""


@dataclass
class PrefData:
    train: list[PrefSample]
    eval: list[PrefSample] | None
    drops: dict[str, int] = field(default_factory=dict)
    n_rows: int = 0


def encode_preference(rec: RankedResponses, tokenizer, *, max_length: int | None, system: str | None) -> PrefSample:
    """Tokenize each prompt + response with the one template path; raises DropSample to drop."""
    if len({(m.content, str(m.tool_calls)) for m in rec.responses}) < len(rec.responses):
        raise DropSample("chosen_equals_rejected", rec.source)
    pairs = rec.pairs()
    if not pairs:
        raise DropSample("all_ranks_tied", rec.source)
    ids, weights = [], []
    for resp in rec.responses:
        conv = Conversation(messages=[*rec.prompt, resp], source=rec.source)
        (enc,) = encode_conversation(conv, tokenizer, mask="last", max_length=max_length, system=system)
        ids.append(enc.input_ids)
        weights.append(enc.weights)
    return PrefSample(ids, weights, pairs, rec.margin, source=rec.source)


def read_preferences(ds_cfg, variables: Mapping[str, str] | None = None, drops: Counter | None = None,
                     strict: bool = False) -> list[RankedResponses]:
    """A file's rows as records; rows with content problems are counted in `drops` (fatal when strict)."""
    rows = read_rows(ds_cfg.path)
    drops = Counter() if drops is None else drops
    recs = []
    for i, row in enumerate(rows):
        try:
            recs.append(row_to_preference(row, source=source_of(ds_cfg.path, i), columns=ds_cfg.columns,
                                          role_tags=ds_cfg.role_tags, variables=variables))
        except ContentProblem as problem:
            count_problem(drops, problem, strict)
    if ds_cfg.max_samples is not None and ds_cfg.max_samples < len(recs):
        keep = np.sort(np.random.default_rng(0).permutation(len(recs))[: ds_cfg.max_samples])
        recs = [recs[i] for i in keep]
    return recs


def encode_all(recs: list[RankedResponses], tokenizer, max_length, system, drops: Counter,
               strict: bool = False) -> list[PrefSample]:
    out = []
    for rec in recs:
        try:
            out.append(encode_preference(rec, tokenizer, max_length=max_length, system=system))
        except DropSample as drop:
            drop_sample(drops, drop, rec.source, strict)
    return out


def build_preference_data(data_cfg, template_cfg, tokenizer, seed: int) -> PrefData:
    """Read, hold out (val_size or eval_datasets), and encode preference files."""
    apply_template(tokenizer, template_cfg.name)
    drops: Counter = Counter()
    strict = data_cfg.strict
    train = [r for ds in data_cfg.datasets for r in read_preferences(ds, data_cfg.variables, drops, strict)]
    evals = [r for ds in data_cfg.eval_datasets for r in read_preferences(ds, data_cfg.variables, drops, strict)]
    n_rows = len(train) + len(evals) + sum(drops.values())
    if not evals and data_cfg.val_size > 0:
        n_val = int(data_cfg.val_size) if data_cfg.val_size >= 1 else max(1, round(data_cfg.val_size * len(train)))
        if n_val >= len(train):
            raise PosttrainError(f"data.val_size={data_cfg.val_size} leaves no preference rows to train on")
        held = set(np.random.default_rng([seed, 3]).choice(len(train), n_val, replace=False).tolist())
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    train_s = encode_all(train, tokenizer, data_cfg.max_length, template_cfg.system, drops, strict)
    eval_s = encode_all(evals, tokenizer, data_cfg.max_length, template_cfg.system, drops, strict)
    if not train_s:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(drops.items())) or "no rows"
        raise PosttrainError(f"no preference samples left ({n_rows} rows read; dropped {counts})")
    return PrefData(train_s, eval_s or None, dict(drops), n_rows)


def shared_prefix(sample: PrefSample) -> int:
    """Tokens every response of a prompt starts with and none is trained on (the rendered prompt), or 0."""
    ids = sample.input_ids
    n = min(len(x) for x in ids) - 1  # each response keeps at least one token of its own
    first_loss = min(next((t for t, w in enumerate(ws) if w != 0), len(ws)) for ws in sample.weights)
    p = 0
    while p < min(n, first_loss) and all(x[p] == ids[0][p] for x in ids):
        p += 1
    return p


def _one_row(flat: list[tuple[list[int], list[float], int, int]]) -> tuple[dict, list[tuple[int, int, int]]]:
    """Sequences (ids, weights, shared prefix p, prompt) -> one packed row. The first sequence of a prompt
    carries the p prefix tokens; the others continue at position p after their own predecessor, which
    is how packed_attention recognises that they attend to that prefix."""
    import torch

    ids, pos, w, where = [], [], [], []  # where[r] = (column of r's own tokens, p, column of r's prefix)
    prompt = prefix_col = None
    for seq_ids, seq_w, p, g in flat:
        if g != prompt:
            prompt, prefix_col = g, len(ids)
            ids += seq_ids[:p]
            pos += list(range(p))
            w += seq_w[:p]
        where.append((len(ids), p, prefix_col))
        ids += seq_ids[p:]
        pos += list(range(p, len(seq_ids)))
        w += seq_w[p:]
    batch = {"input_ids": torch.tensor([ids]), "weights": torch.tensor([w], dtype=torch.float32),  # (1, T)
             "position_ids": torch.tensor([pos]), "real_mask": torch.ones((1, len(ids)), dtype=torch.bool)}
    return batch, where


def collate_preferences(units: list[list[int]], samples: list[PrefSample], pad_id: int, pack: bool = False,
                        share_prompt: bool = False) -> dict:
    """Every response of every prompt in the micro-batch is one sequence; pairs index those sequences.

    pack=False: one right-padded row per sequence (what a sequence-classification reward model reads).
    pack=True: all sequences in one row (no padding), position ids restarting per sequence; with
    share_prompt the responses of a prompt share one copy of its prompt tokens (needs per-sample
    attention, models/packed_attention.py). target_* (N,) name every supervised token: the row and
    column of the position that predicts it, its id, weight and sequence.
    pair_weight = 1 / (pairs of the prompt), so a K-response prompt counts once whatever K is.
    """
    import torch

    from posttrain.data.collate import collate

    flat, better, worse, margin, weight, ref = [], [], [], [], [], []
    for unit in units:
        for i in unit:
            s, base = samples[i], len(flat)
            p = shared_prefix(s) if pack and share_prompt else 0
            flat += [(ids, ws, p, i) for ids, ws in zip(s.input_ids, s.weights)]
            for b, w in s.pairs:
                better.append(base + b)
                worse.append(base + w)
                margin.append(s.margin)
                weight.append(1.0 / len(s.pairs))
            ref += s.ref_logps or []
    if pack:
        batch, where = _one_row(flat)
    else:
        batch = collate([[k] for k in range(len(flat))], input_ids=[f[0] for f in flat],
                        weights=[f[1] for f in flat], pad_id=pad_id)
        where = [(0, 0, 0)] * len(flat)
    targets = []  # (row, column of the predicting position, target id, weight, sequence)
    for r, ((ids, ws, *_), (col, p, prefix_col)) in enumerate(zip(flat, where)):
        row = 0 if pack else r
        for t in range(1, len(ids)):
            if ws[t] != 0:
                targets.append((row, prefix_col + t - 1 if t - 1 < p else col + t - 1 - p, ids[t], ws[t], r))
    rows, cols, tgt, tw, seq = zip(*targets) if targets else ((),) * 5
    batch.update(target_row=torch.tensor(rows, dtype=torch.long), target_pos=torch.tensor(cols, dtype=torch.long),
                 target_ids=torch.tensor(tgt, dtype=torch.long), target_weight=torch.tensor(tw),
                 target_seq=torch.tensor(seq, dtype=torch.long), n_samples=torch.tensor(len(flat)),
                 seq_lengths=torch.tensor([len(f[0]) for f in flat]),  # (R,) as rendered, shared prompt included
                 shared_prompt=torch.tensor(any(f[2] for f in flat)),  # some responses continue a shared prompt
                 pair_better=torch.tensor(better), pair_worse=torch.tensor(worse),  # (P,) sequence indices
                 pair_margin=torch.tensor(margin), pair_weight=torch.tensor(weight))  # (P,)
    if ref:
        if len(ref) != len(flat):
            raise PosttrainError("reference log-probs were precomputed for only some samples")
        batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)  # (R,)
    return batch
