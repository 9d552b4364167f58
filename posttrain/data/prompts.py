"""Prompts read from data files: items to answer and score (eval generate / compare, the UI's candidates)
and the prompts an RL stage samples responses to.

A prompt file is JSONL/JSON/CSV in any SFT layout (alpaca, sharegpt, openai): the last assistant turn
is the reference and the turns before it are the prompt. Rows of the form {"prompt": ..., "reference": ...}
work too (reference optional: comparisons need none).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.formats import row_to_conversation
from posttrain.data.row_context import RowContext
from posttrain.data.policy import ContentProblem, count_problem, drop_or_raise, drop_summary
from posttrain.data.reading import read_rows, source_of
from posttrain.errors import DataError, PosttrainError
from posttrain.records import Message
from posttrain.templates.render import encode_prompt

log = logging.getLogger("posttrain")


@dataclass
class PromptItem:
    id: str
    messages: list[Message]  # the conversation to answer (ends with a user turn)
    reference: str | None
    category: str | None = None  # optional "category" field: comparisons also report win rates per category


def read_prompts(path: str | Path, variables: dict[str, str] | None = None, strict: bool = False) -> list[PromptItem]:
    """Prompt items in file order; ids are the rows' "id" fields, else their 0-based row numbers.

    Rows with content problems (a blank prompt or turn) are dropped, counted and logged by reason,
    or fatal with `strict` (data/policy.py); structural problems always are."""
    items: list[PromptItem] = []
    seen: set[str] = set()
    drops: Counter = Counter()
    for i, row in enumerate(read_rows(path)):
        source = source_of(path, i)
        item_id = str(row["id"] if row.get("id") is not None else i)
        if item_id in seen:  # ids key the answer and vote caches
            raise DataError(f"{source}: duplicate prompt id {item_id!r}")
        seen.add(item_id)
        try:
            items.append(_prompt_item(row, item_id, source, variables))
        except ContentProblem as problem:
            count_problem(drops, problem, strict)
    if drops:
        log.warning("%s: dropped %d prompts (%s)", path, sum(drops.values()), drop_summary(drops))
    return items


def _prompt_item(row: dict, item_id: str, source: str, variables: dict[str, str] | None) -> PromptItem:
    category = row.get("category")
    if isinstance(row.get("prompt"), str):
        ref = row.get("reference") or row.get("output") or row.get("answer")
        text = RowContext(source, {}).text(row["prompt"], "prompt")
        return PromptItem(item_id, [Message("user", text)], ref, category)
    fields = {k: v for k, v in row.items() if v is not None and k not in ("id", "category")}
    conv = row_to_conversation(fields, "auto", source=source, variables=variables)
    messages, ref = list(conv.messages), None
    if messages and messages[-1].role == "assistant":
        ref = messages.pop().content
    if not messages or messages[-1].role != "user":
        raise DataError(f"{source}: a prompt must end with a user turn")
    return PromptItem(item_id, messages, ref, category)


@dataclass
class Prompt:
    messages: list[Message]  # the conversation up to (not including) the reply to generate
    ids: list[int]  # encode_prompt(messages): template + generation header, as in training
    reference: str | None = None  # the data's final assistant reply (cut off): what exact-match rewards compare to

    @property
    def text(self) -> str:
        """The last user message: what rule rewards and reward models read as the prompt."""
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")


def load_prompts(data_cfg, template_cfg, tokenizer, max_new_tokens: int,
                 datasets=None) -> tuple[list[Prompt], dict[str, int]]:
    """Every conversation in `datasets` (default data.datasets), cut before its final assistant turn (kept
    as the prompt's reference), encoded for generation.

    Returns (prompts, drops by reason): rows with content problems (data/policy.py: a blank turn, no
    user turn, ids leaving no room for max_new_tokens within data.max_length) are dropped and counted,
    or fatal under data.strict.
    """
    prompts, drops = [], Counter()
    for ds in datasets if datasets is not None else data_cfg.datasets:
        rows = read_rows(ds.path)
        limit = len(rows) if ds.max_samples is None else min(ds.max_samples, len(rows))
        for i in range(limit):
            source = source_of(ds.path, i)
            try:
                conv = row_to_conversation(rows[i], ds.format, source=source, columns=ds.columns,
                                           role_tags=ds.role_tags, variables=data_cfg.variables)
            except ContentProblem as problem:
                count_problem(drops, problem, data_cfg.strict)
                continue
            messages, reference = list(conv.messages), None
            while messages and messages[-1].role == "assistant":
                reference = messages.pop().content if reference is None else reference
            if not any(m.role == "user" for m in messages):
                drop_or_raise(drops, "no_user_turn", source, data_cfg.strict)
                continue
            ids = encode_prompt(messages, tokenizer, tools=conv.tools, system=template_cfg.system)
            if len(ids) + max_new_tokens > data_cfg.max_length:
                drop_or_raise(drops, "too_long", source, data_cfg.strict, f"prompt of {len(ids)} tokens leaves no room "
                              f"for max_new_tokens={max_new_tokens} within data.max_length={data_cfg.max_length}")
                continue
            prompts.append(Prompt(messages, ids, reference))
    if not prompts:
        dropped = drop_summary(drops) or "none"
        paths = ", ".join(d.path for d in (datasets if datasets is not None else data_cfg.datasets))
        raise PosttrainError(f"no usable prompts in {paths} (dropped: {dropped})")
    return prompts, dict(drops)
