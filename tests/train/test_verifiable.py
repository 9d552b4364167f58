"""Verifiable rewards (final-answer exact match, format regex), weighted reward sets, grpo config rules."""

import pytest
import torch

from posttrain.errors import ConfigError, PosttrainError
from posttrain.train.reward_set import RewardSet, RewardTerm, build_reward_set
from posttrain.train.verifiable import ExactMatch, FormatMatch, final_answer, same_answer


@pytest.mark.parametrize("text, kind, answer", [
    ("3 + 4 = 7\n#### 7", "auto", "7"),
    ("#### 5 then more thinking\n#### 12", "hash", "12"),  # the last marker counts
    ("so \\boxed{\\frac{1}{2}} is it", "boxed", "\\frac{1}{2}"),  # nested braces kept
    ("#### 3 ... final: \\boxed{4}", "auto", "4"),  # auto: whichever marker comes last
    ("\\boxed{4} ... #### 3", "auto", "3"),
    ("\\boxed{4", "boxed", None),  # unclosed
    ("no marker here", "auto", None),
    ("\\boxed{9}", "hash", None),  # the kind asked for only
    ("Tom has 10 + 3 = 13 apples.\nSo 1,013 in all.", "number", "1,013"),  # the last number; the period ends it
    ("It is -2.5, or 7", "number", "7"),
    ("10-3=-7.", "number", "-7"),
    ("no digits", "number", None),
])
def test_final_answer(text, kind, answer):
    assert final_answer(text, kind) == answer


def test_answers_compare_after_normalisation_and_by_value():
    assert same_answer("1,000", "1000") and same_answer("$8.0", "8") and same_answer(" 42. ", "42")
    assert not same_answer("14 apples", "14") and not same_answer("", "") and not same_answer("7", "-7")


def test_exact_match_scores_against_the_reference():
    em = ExactMatch("auto")
    responses = ["3 + 4 = 7\n#### 7", "#### 8", "The answer is 7", "\\boxed{7}"]
    # the reference's own final answer counts; a reference with no marker is the answer itself
    assert em(["q"] * 4, responses, ["3 + 4 = 7\n#### 7"] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert em(["q"], ["#### 7"], ["7"]) == [1.0]
    with pytest.raises(ValueError, match="reference"):
        em(["q"], ["#### 7"], [None])
    number = ExactMatch("number")  # the reference's last number; no marker needed in the reply
    assert number(["q"] * 3, ["So he has 7 now.", "7 + 1 = 8", "#### 7"], ["3 + 4 = 7\n#### 7"] * 3) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="unknown answer format"):
        ExactMatch("last")


def test_format_reward_matches_the_whole_stripped_reply():
    fmt = FormatMatch(r".*\n#### -?\d+")
    assert fmt(["q"] * 3, ["2 + 2 = 4\n#### 4  ", "#### 4", "x\n#### 4 and more"]) == [1.0, 0.0, 0.0]


def _cfg(overrides):
    from posttrain.train.config import load_config

    base = ["stage=grpo", "model.name_or_path=tiny-random", "data.datasets=[{path: x.jsonl}]", "train.max_steps=1"]
    return load_config(None, base + overrides)


def test_weighted_sources_sum_and_report_each(tmp_path):
    (tmp_path / "r.py").write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")
    cfg = _cfg(["reward.sources=[{type: exact_match, weight: 2.0}, {type: format, pattern: '#### \\d+', "
                "weight: 0.5, name: fmt}, {type: function, function: '" + str(tmp_path / "r.py") + ":length', "
                "weight: -0.1}]"])
    rewards = build_reward_set(cfg.reward)
    assert rewards.names == ["exact_match", "fmt", "function"] and rewards.accuracy == "exact_match"
    scores = rewards.score(["q", "q"], ["#### 7", "it is 7"], ["#### 7", "#### 7"])
    assert scores.tolist() == [[1.0, 1.0, 6.0], [0.0, 0.0, 7.0]]
    # 2 * 1 + 0.5 * 1 - 0.1 * 6 = 1.9; 2 * 0 + 0.5 * 0 - 0.1 * 7 = -0.7
    assert torch.allclose(rewards.total(scores), torch.tensor([1.9, -0.7]), atol=1e-6)


def test_reward_functions_may_take_references(tmp_path):
    (tmp_path / "r.py").write_text("def ref_len(prompts, responses, references):\n"
                                   "    return [len(r) - len(x) for r, x in zip(responses, references)]\n")
    rewards = build_reward_set(_cfg([f"reward.function={tmp_path / 'r.py'}:ref_len"]).reward)
    assert rewards.needs_references and rewards.accuracy is None
    assert rewards.score(["q"], ["abcd"], ["ab"]).tolist() == [[2.0]]


def test_a_source_returning_bad_scores_is_a_clear_error():
    bad = RewardSet([RewardTerm("short", 1.0, lambda p, r: [1.0], False)])
    with pytest.raises(PosttrainError, match="reward short: 1 scores for 2 responses"):
        bad.score(["q", "q"], ["a", "b"], [None, None])
    nan = RewardSet([RewardTerm("nan", 1.0, lambda p, r: [float("nan")], False)])
    with pytest.raises(PosttrainError, match="not a finite number"):
        nan.score(["q"], ["a"], [None])


@pytest.mark.parametrize("overrides, message", [
    (["reward.type=format"], "reward.type=format needs reward.pattern"),
    (["reward.type=format", "reward.pattern=(unclosed"], "not a valid regex"),
    (["reward.sources=[{type: exact_match}, {type: exact_match}]"], "names must differ"),
    (["reward.sources=[{type: model}]"], r"reward.sources\[0\].type=model needs reward.sources\[0\].model"),
    (["reward.type=exact_match", "grpo.group_size=1"], "group_size must be >= 2"),
    (["reward.type=exact_match", "grpo.mini_batch_size=3"], "must divide the step's 32 responses"),
    (["reward.type=exact_match", "reward.normalize=true"], "does not apply to stage grpo"),
])
def test_grpo_config_rules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(overrides)


def test_ppo_refuses_grpo_only_rewards():
    from posttrain.train.config import load_config

    with pytest.raises(ConfigError, match="read by stage grpo"):
        load_config(None, ["stage=ppo", "model.name_or_path=tiny-random", "data.datasets=[{path: x.jsonl}]",
                           "train.max_steps=1", "reward.type=exact_match"])
