"""Best-of-n estimator, best-of-n KL and the Gao et al. RL fit, against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhf_lightning.analysis.overoptimisation import (
    GaoFit,
    best_of_n_curve,
    best_of_n_expectation,
    best_of_n_kl,
    best_of_n_weights,
    default_ns,
    fit_gao_rl,
    measured_peak,
)


def test_best_of_n_kl_by_hand():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)  # 0.6363
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_best_of_n_weights_by_hand():
    # N = 4, n = 2: C(i-1, 1) / C(4, 2) = [0, 1, 2, 3] / 6
    expected = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64) / 6
    torch.testing.assert_close(best_of_n_weights(4, 2), expected)
    torch.testing.assert_close(best_of_n_weights(5, 1), torch.full((5,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(best_of_n_weights(3, 3), torch.tensor([0.0, 0.0, 1.0]).double())
    with pytest.raises(ValueError):
        best_of_n_weights(3, 4)


def test_best_of_n_expectation_by_hand():
    # values 1, 5, 3 ranked by themselves, n = 2: subsets {1,5}→5, {1,3}→3, {5,3}→5 → 13/3
    values = torch.tensor([[1.0, 5.0, 3.0]])
    assert float(best_of_n_expectation(values, values, 2)) == pytest.approx(13 / 3)
    # gold differs from the proxy: proxy picks index 1 in {0,1}, 2 in {0,2}, 1 in {1,2}
    proxy, gold = torch.tensor([[0.1, 0.3, 0.2]]), torch.tensor([[10.0, 20.0, 30.0]])
    assert float(best_of_n_expectation(proxy, gold, 2)) == pytest.approx((20 + 30 + 20) / 3)
    assert float(best_of_n_expectation(proxy, gold, 1)) == pytest.approx(20.0)  # the mean
    assert float(best_of_n_expectation(proxy, gold, 3)) == pytest.approx(20.0)  # argmax proxy


def test_best_of_n_expectation_equals_subset_enumeration():
    generator = torch.Generator().manual_seed(0)
    proxy, gold = torch.randn(3, 7, generator=generator), torch.randn(3, 7, generator=generator)
    for n in (1, 2, 3, 5, 7):
        brute = [
            sum(
                float(gold[p, max(s, key=lambda i: float(proxy[p, i]))])
                for s in itertools.combinations(range(7), n)
            )
            / math.comb(7, n)
            for p in range(3)
        ]
        torch.testing.assert_close(
            best_of_n_expectation(proxy, gold, n), torch.tensor(brute, dtype=torch.float64)
        )


def test_best_of_n_curve():
    assert default_ns(16) == [1, 2, 4, 8, 16]
    assert default_ns(6) == [1, 2, 4, 6]
    proxy = torch.tensor([[0.1, 0.3, 0.2], [3.0, 1.0, 2.0]])
    gold = torch.tensor([[10.0, 20.0, 30.0], [0.0, 1.0, 2.0]])
    curve = best_of_n_curve(proxy, gold, [1, 3])
    assert [p["n"] for p in curve] == [1, 3]
    assert curve[0]["proxy"] == pytest.approx((0.2 + 2.0) / 2)  # best-of-1: the mean
    assert curve[0]["gold"] == pytest.approx((20.0 + 1.0) / 2)
    assert curve[1]["gold"] == pytest.approx((20.0 + 0.0) / 2)  # argmax proxy per prompt
    assert curve[1]["kl"] == pytest.approx(math.log(3) - 2 / 3)
    assert curve[1]["sqrt_kl"] == pytest.approx(math.sqrt(math.log(3) - 2 / 3))
    assert "gold" not in best_of_n_curve(proxy)[0]


def test_gao_fit_two_points_by_hand():
    # R(d) = d (α − b log d) with α = 2, b = 1: R(1) = 2, R(e) = e (2 − 1) = e
    fit = fit_gao_rl([1.0, math.e], [2.0, math.e])
    assert fit.alpha == pytest.approx(2.0) and fit.b == pytest.approx(1.0)
    assert fit.peak_sqrt_kl == pytest.approx(math.e)  # exp(α/b − 1) = e
    assert fit.peak_kl == pytest.approx(math.e**2)


def test_gao_fit_recovers_synthetic_curve_exactly():
    alpha, b = 1.3, 0.45
    d = torch.linspace(0.2, 6.0, 25, dtype=torch.float64)
    gold = d * (alpha - b * d.log())
    fit = fit_gao_rl(
        torch.cat([torch.zeros(1), d]), torch.cat([torch.zeros(1), gold])
    )  # d=0 kept out
    assert fit.alpha == pytest.approx(alpha, abs=1e-9) and fit.b == pytest.approx(b, abs=1e-9)
    d_star = math.exp(alpha / b - 1)
    torch.testing.assert_close(
        fit(torch.tensor([0.0, d_star])), torch.tensor([0.0, b * d_star], dtype=torch.float64)
    )  # R(d*) = b d*
    torch.testing.assert_close(fit(d), gold)


def test_gao_fit_without_peak_or_enough_points():
    assert fit_gao_rl([0.5], [0.2]) is None
    assert fit_gao_rl([0.0, 0.0, 1.0], [0.0, 0.0, 1.0]) is None  # one usable point
    assert fit_gao_rl([2.0, 2.0], [1.0, 1.1]) is None  # all d equal: α, b not identifiable
    rising = fit_gao_rl([1.0, 2.0, 3.0], [1.0, 2.0 * (1 + math.log(2)), 3.0 * (1 + math.log(3))])
    assert rising.b == pytest.approx(-1.0) and rising.peak_kl is None  # keeps rising: no peak
    assert GaoFit(1.0, 0.0).peak_sqrt_kl is None
    assert GaoFit(1.0, 1e-6).peak_kl == math.inf  # exp(α/b − 1) overflows: reported, not raised


def test_measured_peak():
    points = [
        {"kl": 0.0, "gold": 0.1},
        {"kl": 1.0, "gold": 0.5},
        {"kl": 4.0, "gold": None},
        {"kl": 9.0, "gold": 0.5},
    ]
    assert measured_peak(points) == {"kl": 1.0, "gold": 0.5}  # first of the tied maxima
    assert measured_peak([{"gold": None}]) is None
