"""Preference files -> RankedResponses -> token ids, for the reward-model and DPO stages.

Layouts (auto-detected per row):
- explicit prompt: `prompt` + `chosen` + `rejected`, each a string or a message list;
- implicit prompt: `chosen` + `rejected` full conversations; their shared prefix is the prompt;
- hh-rlhf: `chosen` + `rejected` strings, each a whole "\n\nHuman: ... \n\nAssistant: ..." transcript
  (data/transcripts.py): the shared turns are the prompt, the final Assistant turns the responses;
- sharegpt: `conversations` (the prompt turns) + `chosen` + `rejected` turns ({from, value});
- ranked: `prompt` + `responses` (K = 2..9 strings or messages) + `ranks` (0 = best, ties allowed),
  or `scores` instead of `ranks` (higher is better; data/scores.py turns them into ranks and margins).
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

from posttrain.data.formats import fill_variables, parse_openai, parse_sharegpt, refuse_media, rename_columns, role_map
from posttrain.data.policy import ContentProblem, count_problem, drop_sample
from posttrain.data.reading import read_rows, source_of
from posttrain.data.row_context import EMPTY_RESPONSE, RowContext
from posttrain.data.scores import pair_margins, row_ranks
from posttrain.data.transcripts import transcript_pair
from posttrain.records import Conversation, Message, PreferencePair, RankedResponses
from posttrain.data.holdout import split_off
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


def _ranked(row: Mapping, ctx: RowContext, tags, scoring: tuple[float, float]) -> RankedResponses:
    """scoring: (epsilon, margin_scale) for rows that give `scores` instead of `ranks`."""
    responses = ctx.items(row.get("responses"), "responses")
    if not 2 <= len(responses) <= MAX_RANKED:
        raise ctx.fail("responses", f"must hold 2..{MAX_RANKED} responses, got {len(responses)}")
    ranks, scores = row_ranks(row, len(responses), scoring[0], ctx)
    if (not isinstance(ranks, list) or len(ranks) != len(responses)
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)):
        raise ctx.fail("ranks", f"must be a list of {len(responses)} integers (0 = best, ties allowed), got {ranks!r}")
    prompt = _messages(row.get("prompt"), ctx, "prompt", tags)
    out = [_response(r, ctx, f"responses[{i}]", tags) for i, r in enumerate(responses)]
    rec = RankedResponses(prompt, out, list(ranks), 0.0, ctx.source)
    if scores is not None and scoring[1]:
        rec.margins = pair_margins(scores, rec.pairs(), scoring[1])
    return rec


def row_to_preference(row: Mapping, *, source: str, columns: Mapping[str, str] | None = None,
                      role_tags: Mapping[str, str] | None = None,
                      variables: Mapping[str, str] | None = None,
                      scoring: tuple[float, float] = (0.0, 0.0)) -> RankedResponses:
    """One file row in any supported layout -> RankedResponses (a pair is K = 2). scoring: (epsilon,
    margin_scale) for ranked rows with `scores` (see data/scores.py)."""
    columns = columns or {}
    row = rename_columns(row, columns)
    ctx, tags = RowContext(source, columns), role_map(role_tags)
    refuse_media(row, ctx)
    if row.get("responses") is not None:
        rec = _ranked(row, ctx, tags, scoring)
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
    pair_margins: list[float] | None = None  # one per pair (from score gaps); else `margin` for every pair
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
    return PrefSample(ids, weights, pairs, rec.margin, source=rec.source, pair_margins=rec.margins)


def read_preferences(ds_cfg, variables: Mapping[str, str] | None = None, drops: Counter | None = None,
                     strict: bool = False) -> list[RankedResponses]:
    """A file's rows as records; rows with content problems are counted in `drops` (fatal when strict)."""
    rows = read_rows(ds_cfg.path)
    drops = Counter() if drops is None else drops
    scoring = (ds_cfg.score_epsilon, ds_cfg.score_margin)
    recs = []
    for i, row in enumerate(rows):
        try:
            recs.append(row_to_preference(row, source=source_of(ds_cfg.path, i), columns=ds_cfg.columns,
                                          role_tags=ds_cfg.role_tags, variables=variables, scoring=scoring))
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
        train, evals = split_off(train, data_cfg.val_size, seed, "preference")
    train_s = encode_all(train, tokenizer, data_cfg.max_length, template_cfg.system, drops, strict)
    eval_s = encode_all(evals, tokenizer, data_cfg.max_length, template_cfg.system, drops, strict)
    if not train_s:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(drops.items())) or "no rows"
        raise PosttrainError(f"no preference samples left ({n_rows} rows read; dropped {counts})")
    return PrefData(train_s, eval_s or None, dict(drops), n_rows)
