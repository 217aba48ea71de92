"""Tests for minirlhf/stats.py: the statistics of the evaluation against plain references.

A win rate with ties counted half, best-of-n's KL in closed form, the unbiased best-of-n estimator
(checked against enumerating every n-subset), the KL-regularised optimum (limits and a plain
loop), and Gao et al.'s least-squares fits (they must recover known parameters exactly).
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from minirlhf import stats


# ---------------------------------------------------------------------------------------------
# win rates


def test_win_rate_hand_worked():
    # pairs: 3>1 win, 2=2 tie, 1<3 loss, 5>4 win -> (2 + 0.5) / 4; excluding the tie: 2 of 3
    result = stats.win_rate([3, 2, 1, 5], [1, 2, 3, 4])
    assert result["win_rate"] == pytest.approx(0.625), f"win rate: expected 0.625, got {result['win_rate']}"
    assert result["tie_rate"] == pytest.approx(0.25), f"tie rate: expected 0.25, got {result['tie_rate']}"
    assert result["win_rate_excl_ties"] == pytest.approx(2 / 3), "win rate excluding ties: expected 2/3"
    assert result["pairs"] == 4


def test_win_rate_pairs_answer_j_with_answer_j_and_counts_float_ties():
    # (S=2, N=2) arrays are paired elementwise, not all against all; 0.1 + 0.2 vs 0.3 is a tie
    a = np.array([[0.1 + 0.2, 1.0], [2.0, 0.0]])
    b = np.array([[0.3, 0.0], [1.0, 5.0]])
    result = stats.win_rate(a, b)
    assert result["tie_rate"] == pytest.approx(0.25), "0.1 + 0.2 vs 0.3 must count as a tie"
    assert result["win_rate"] == pytest.approx((2 + 0.5) / 4)
    all_ties = stats.win_rate([1.0, 2.0], [1.0, 2.0])
    assert all_ties["win_rate"] == 0.5 and math.isnan(all_ties["win_rate_excl_ties"])
    with pytest.raises(ValueError):
        stats.win_rate([1.0, 2.0], [1.0])


# ---------------------------------------------------------------------------------------------
# best-of-n


def test_best_of_n_kl_closed_form():
    assert stats.best_of_n_kl(1) == 0.0, "best-of-1 is the policy itself: KL 0"
    assert stats.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert stats.best_of_n_kl(32) == pytest.approx(math.log(32) - 31 / 32)


def test_best_of_n_expected_hand_worked():
    rm, gold = [0.1, 0.9, 0.5], [1.0, 2.0, 3.0]
    # n = 1: the mean, 2. n = 2: subsets {0,1} -> sample 1 (gold 2), {0,2} -> sample 2 (gold 3),
    # {1,2} -> sample 1 (gold 2): 7/3. n = 3: the RM's favourite, sample 1: gold 2.
    for n, expected in ((1, 2.0), (2, 7 / 3), (3, 2.0)):
        got = stats.best_of_n_expected(rm, gold, n)
        assert got == pytest.approx(expected), f"best-of-{n}: expected {expected}, got {got}"
    with pytest.raises(ValueError):
        stats.best_of_n_expected(rm, gold, 4)


def test_best_of_n_expected_matches_enumerating_every_subset():
    rng = random.Random(0)
    N = 7
    rm = [rng.gauss(0, 1) for _ in range(N)]
    gold = [rng.uniform(0, 8) for _ in range(N)]
    for n in range(1, N + 1):
        picks = [gold[max(subset, key=lambda i: rm[i])] for subset in itertools.combinations(range(N), n)]
        expected = sum(picks) / len(picks)
        got = stats.best_of_n_expected(rm, gold, n)
        assert got == pytest.approx(expected, abs=1e-12), f"best-of-{n} of {N}: expected {expected}, got {got}"


def test_kl_regularised_optimum_hand_worked():
    # scores (0, ln 3), beta 1: weights 1/4, 3/4. Values (1, 2): E = 1.75; KL = 1/4 ln(1/2) + 3/4 ln(3/2);
    # sample 1 beats an SFT sample with 1/2 (tie) * 1/2 = 1/4, sample 2 with (1 + 1/2) / 2 = 3/4: 5/8.
    value, kl, win = stats.kl_regularised_optimum([0.0, math.log(3)], [1.0, 2.0], beta=1.0)
    assert value == pytest.approx(1.75)
    assert kl == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert win == pytest.approx(0.625)


def test_kl_regularised_optimum_limits_and_a_plain_loop():
    rng = random.Random(1)
    N = 6
    scores = [rng.gauss(0, 1) for _ in range(N)]
    values = [float(rng.randint(0, 3)) for _ in range(N)]   # small integers: ties happen
    # beta -> infinity: the SFT policy itself (uniform weights): the mean, KL 0, win rate 1/2 against itself
    value, kl, win = stats.kl_regularised_optimum(scores, values, beta=1e9)
    assert value == pytest.approx(sum(values) / N) and kl == pytest.approx(0.0, abs=1e-9) and win == pytest.approx(0.5)
    # beta -> 0: all weight on the top-scoring sample: KL log N
    value, kl, _ = stats.kl_regularised_optimum(scores, values, beta=1e-6)
    assert value == values[scores.index(max(scores))] and kl == pytest.approx(math.log(N))
    # any beta, against a plain loop
    for beta in (0.3, 1.0, 2.0):
        weights = [math.exp(x / beta) for x in scores]
        weights = [w / sum(weights) for w in weights]
        kl_loop = sum(w * math.log(N * w) for w in weights)
        win_loop = 0.0
        for i in range(N):
            for j in range(N):
                win_loop += weights[i] / N * (1.0 if values[i] > values[j] else 0.5 if values[i] == values[j] else 0.0)
        value, kl, win = stats.kl_regularised_optimum(scores, values, beta)
        assert value == pytest.approx(sum(w * v for w, v in zip(weights, values)))
        assert kl == pytest.approx(kl_loop) and win == pytest.approx(win_loop)


# ---------------------------------------------------------------------------------------------
# Gao et al.'s fits


def test_fit_gao_recovers_known_parameters():
    d = np.array([0.0, 0.4, 0.9, 1.3, 2.0, 2.6])
    bon = d * (0.8 - 0.3 * d)
    fit = stats.fit_gao(d, bon, "bon")
    assert fit["alpha"] == pytest.approx(0.8) and fit["beta"] == pytest.approx(0.3), f"best-of-n fit: {fit}"
    assert fit["r2"] == pytest.approx(1.0)
    log_d = np.array([0.0] + [math.log(x) for x in d[1:]])  # d log d -> 0 at d = 0
    rl = d * (1.1 - 0.5 * log_d)
    fit = stats.fit_gao(d, rl, "rl")
    assert fit["alpha"] == pytest.approx(1.1) and fit["beta"] == pytest.approx(0.5), f"RL fit: {fit}"
    assert np.allclose(stats.gao_curve(fit, d, "rl"), rl), "gao_curve must give back the fitted values"


def test_fit_gao_r2_against_plain_formula_and_too_few_points():
    d = [0.0, 1.0, 2.0, 3.0]
    gain = [0.0, 1.0, 1.0, 0.5]
    fit = stats.fit_gao(d, gain, "bon")
    predicted = [x * (fit["alpha"] - fit["beta"] * x) for x in d]
    mean = sum(gain) / len(gain)
    r2 = 1 - sum((g - p) ** 2 for g, p in zip(gain, predicted)) / sum((g - mean) ** 2 for g in gain)
    assert fit["r2"] == pytest.approx(r2), f"R^2: expected {r2}, got {fit['r2']}"
    assert 0 < fit["r2"] < 1
    assert stats.fit_gao([0.0, 1.0], [0.0, 1.0], "rl") is None, "two points cannot judge a two-parameter fit"
    with pytest.raises(ValueError):
        stats.fit_gao(d, gain, "ppo")
