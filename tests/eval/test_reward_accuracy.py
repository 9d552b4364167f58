"""`posttrain score`'s reward vs response-length correlation: hand-computed values."""

import pytest

from posttrain.eval.reward_accuracy import length_correlation


def test_length_correlation_hand_computed():
    # rewards deviations (-1.5, -.5, .5, 1.5), lengths (-17.5, -7.5, 2.5, 22.5): r = 65 / sqrt(5 * 875)
    got = length_correlation([1.0, 2.0, 3.0, 4.0], [10, 20, 30, 50])
    assert got == {"responses": 4, "pearson": pytest.approx(65 / (5 * 875) ** 0.5, abs=1e-6), "spearman": 1.0}


def test_spearman_gives_tied_lengths_their_average_rank():
    # reward ranks (3, 1, 4, 2), length ranks (3.5, 3.5, 1, 2): rho = -3 / sqrt(5 * 4.5);
    # pearson: deviations (.125, -1.375, 1.625, -.375) and (1.5, 1.5, -2.5, -.5): -5.75 / sqrt(4.6875 * 11)
    got = length_correlation([0.5, -1.0, 2.0, 0.0], [5, 5, 1, 3])
    assert got["spearman"] == pytest.approx(-3 / (5 * 4.5) ** 0.5, abs=1e-6)
    assert got["pearson"] == pytest.approx(-5.75 / (4.6875 * 11) ** 0.5, abs=1e-6)


def test_undefined_correlation_is_none():
    assert length_correlation([1.0, 2.0], [3, 4])["pearson"] is None  # too few responses
    assert length_correlation([1.0, 2.0, 3.0], [7, 7, 7]) == {"responses": 3, "pearson": None, "spearman": None}
