"""Scores as preferences: UltraFeedback-style `scores` -> ranks (ties within epsilon) and optional pair margins."""

import json

import pytest

from posttrain.data.config import DataConfig, DatasetConfig
from posttrain.templates.config import TemplateConfig
from posttrain.train.config import load_config
from posttrain.data.preference import build_preference_data, row_to_preference
from posttrain.data.preference_batch import collate_preferences
from posttrain.data.scores import ranks_from_scores
from posttrain.errors import ConfigError, DataError

ROW = {"prompt": "q", "responses": ["a", "b", "c", "d"], "scores": [4.5, 2.0, 4.4, 1.0]}


def test_ranks_from_scores_tie_within_epsilon_of_the_group_best():
    assert ranks_from_scores([4.5, 2.0, 4.4, 1.0]) == [0, 2, 1, 3]
    assert ranks_from_scores([4.5, 2.0, 4.4, 1.0], 0.5) == [0, 1, 0, 2]
    assert ranks_from_scores([3.0, 2.7, 2.4], 0.5) == [0, 0, 1]  # 2.4 is 0.6 below its group's best: no chain
    assert ranks_from_scores([2, 2, 2], 0.0) == [0, 0, 0]


def test_scores_give_pairs_and_margins_from_the_gap():
    rec = row_to_preference(ROW, source="s.jsonl line 1", scoring=(0.5, 2.0))
    assert rec.ranks == [0, 1, 0, 2] and rec.pairs() == [(0, 1), (0, 3), (1, 3), (2, 1), (2, 3)]
    assert rec.margins == pytest.approx([5.0, 7.0, 2.0, 4.8, 6.8])
    plain = row_to_preference(ROW, source="s.jsonl line 1")
    assert plain.ranks == [0, 2, 1, 3] and plain.margins is None  # no margin unless asked for


@pytest.mark.parametrize("extra, message", [
    ({"ranks": [0, 1, 2, 3]}, "give ranks or scores, not both"),
    ({"scores": [1, 2]}, "must be a list of 4 numbers"),
    ({"scores": [1, 2, True, 3]}, "finite numbers only"),
    ({"scores": [1, 2, float("nan"), 3]}, "finite numbers only")])
def test_bad_scores_name_the_field(extra, message):
    with pytest.raises(DataError, match=rf"s.jsonl line 2.*'scores'.*{message}"):
        row_to_preference(ROW | extra, source="s.jsonl line 2")


def test_score_rows_train_batches_with_per_pair_margins_and_tied_rows_are_counted(tmp_path, tiny_tokenizer):
    rows = [ROW, {"prompt": "q2", "responses": ["x", "y"], "scores": [3.0, 2.8]},  # ties within 0.5: dropped
            {"prompt": "q3", "responses": ["u", "v"], "ranks": [0, 1], "margin": 1.5}]
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = DatasetConfig(path=str(path), score_epsilon=0.5, score_margin=2.0)
    data = build_preference_data(DataConfig(datasets=[ds], max_length=64), TemplateConfig(name="auto"),
                                 tiny_tokenizer, seed=0)
    assert data.drops == {"all_ranks_tied": 1} and len(data.train) == 2
    batch = collate_preferences([[0, 1]], data.train, tiny_tokenizer.pad_token_id)
    assert batch["pair_margin"].tolist() == pytest.approx([5.0, 7.0, 2.0, 4.8, 6.8, 1.5])


def test_negative_score_settings_are_config_errors():
    with pytest.raises(ConfigError, match="score_epsilon and score_margin must be >= 0"):
        load_config(None, ["model.name_or_path=tiny-random", "data.datasets=[{path: x.jsonl, score_epsilon: -1}]"])
