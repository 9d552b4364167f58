"""Preference layouts -> RankedResponses, errors naming file/line/field, drops, tokenized responses."""

import json

import pytest

from posttrain.data.config import DataConfig, DatasetConfig
from posttrain.templates.config import TemplateConfig
from posttrain.data.preference import build_preference_data, row_to_preference
from posttrain.data.preference_batch import collate_preferences
from posttrain.errors import DataError

Q = [{"role": "user", "content": "What is 2+2?"}]


def _rec(row):
    return row_to_preference(row, source="p.jsonl line 3")


def test_layouts_give_the_same_pair():
    explicit = _rec({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"})
    as_lists = _rec({"prompt": Q, "chosen": [{"role": "assistant", "content": "4"}],
                     "rejected": [{"role": "assistant", "content": "5"}]})
    implicit = _rec({"chosen": Q + [{"role": "assistant", "content": "4"}],
                     "rejected": Q + [{"role": "assistant", "content": "5"}]})
    sharegpt = _rec({"conversations": [{"from": "human", "value": "What is 2+2?"}],
                     "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}})
    for rec in (explicit, as_lists, implicit, sharegpt):
        assert [(m.role, m.content) for m in rec.prompt] == [("user", "What is 2+2?")]
        assert [m.content for m in rec.responses] == ["4", "5"] and rec.pairs() == [(0, 1)]


def test_ranked_list_pairs_skip_ties_and_margin_is_read():
    rec = _rec({"prompt": "q", "responses": ["a", "b", "c", "d"], "ranks": [0, 1, 1, 2]})
    assert rec.pairs() == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert _rec({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}).margin == 2.0


@pytest.mark.parametrize("row, field", [
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "'rejected'"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "'prompt[0].role'"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [0]}, "'ranks'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin'"),
    ({"chosen": Q + [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "5"}]}, "'chosen'"),
])
def test_errors_name_source_and_field(row, field):
    with pytest.raises(DataError, match="p.jsonl line 3") as err:
        _rec(row)
    assert field in str(err.value)


def test_not_a_preference_row():
    with pytest.raises(DataError, match="not a preference row"):
        _rec({"instruction": "x", "output": "y"})


def test_build_drops_equal_pairs_and_masks_only_the_response(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Say hi", "chosen": "hi there", "rejected": "go away"},
            {"prompt": "Same", "chosen": "x", "rejected": "x"},
            {"prompt": "Rank", "responses": ["a", "b", "c"], "ranks": [0, 0, 0]}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = build_preference_data(DataConfig(datasets=[DatasetConfig(path=str(path))], max_length=64),
                                 TemplateConfig(name="auto"), tiny_tokenizer, seed=0)
    assert data.drops == {"chosen_equals_rejected": 1, "all_ranks_tied": 1} and len(data.train) == 1
    sample = data.train[0]
    for ids, weights, text in zip(sample.input_ids, sample.weights, ["hi there", "go away"]):
        labelled = tiny_tokenizer.decode([t for t, w in zip(ids, weights) if w])
        assert labelled.startswith(text) and "Say hi" not in labelled  # response (+ end-of-turn) only
    batch = collate_preferences([[0]], data.train, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["pair_better"].tolist() == [0]
    assert batch["real_mask"].dtype.is_floating_point is False


def test_shipped_held_out_pairs_read_whole_and_share_no_prompt_with_rm_training_data():
    from collections import Counter
    from pathlib import Path

    from posttrain.data.preference import read_preferences

    data = Path(__file__).resolve().parents[2] / "examples" / "data"

    def prompts(name):
        drops = Counter()
        recs = read_preferences(DatasetConfig(path=str(data / name)), drops=drops, strict=True)
        return [" ".join(m.content for m in rec.prompt).strip() for rec in recs], drops

    dove, drops = prompts("hh_helpful_dove_val.jsonl")
    assert len(dove) == 363 and not drops
    hand, _ = prompts("prefs_helpful_heldout.jsonl")
    trained = {p for name in ("prefs_broad.jsonl", "prefs_broad_more.jsonl", "prefs_demo_en_zh.jsonl")
               for p in prompts(name)[0]}
    assert trained and not trained & (set(dove) | set(hand))
