"""β controllers: update sequences worked out by hand, validation, checkpoint round trips."""

from __future__ import annotations

import math

import pytest

from rlhf_lightning.control import AdaptiveBeta, BudgetBeta, FixedBeta
from rlhf_lightning.errors import NumericalError


def approx(x: float):
    return pytest.approx(x, rel=0, abs=1e-12)


def test_fixed_beta_never_changes():
    controller = FixedBeta(0.05)
    assert controller.update(100.0) == 0.05
    assert controller.update(0.0, n_steps=64) == 0.05
    assert controller.value == 0.05
    FixedBeta(0.0)  # β = 0 (no penalty) is allowed
    with pytest.raises(ValueError, match=r"kl_controller.beta must be >= 0 \(got -0.1\)"):
        FixedBeta(-0.1)


def test_adaptive_beta_sequence_by_hand():
    controller = AdaptiveBeta(beta=0.1, target=6.0, horizon=10_000)
    # KL 9: e = clip(3/6 = 0.5) = 0.2;   β = 0.1 · (1 + 0.2·256/10000) = 0.1 · 1.00512 = 0.100512
    assert controller.update(9.0, n_steps=256) == approx(0.100512)
    # KL 5.4: e = −0.6/6 = −0.1;        β = 0.100512 · (1 − 0.1·0.0256) = 0.100512 · 0.99744
    assert controller.update(5.4, n_steps=256) == approx(0.100512 * 0.99744)
    # KL 0: e = clip(−1) = −0.2;         β ·= 1 − 0.2·0.0256 = 0.99488
    assert controller.update(0.0, n_steps=256) == approx(0.100512 * 0.99744 * 0.99488)
    # KL on target: no change
    assert controller.update(6.0, n_steps=256) == approx(0.100512 * 0.99744 * 0.99488)


def test_adaptive_beta_validation():
    with pytest.raises(ValueError, match=r"kl_controller.target must be > 0 \(got 0.0\)"):
        AdaptiveBeta(beta=0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError, match=r"kl_controller.horizon must be > 0 \(got -5\)"):
        AdaptiveBeta(beta=0.1, target=1.0, horizon=-5)
    with pytest.raises(ValueError, match="kl_controller.beta must be > 0"):
        AdaptiveBeta(beta=0.0, target=1.0, horizon=100)


def test_budget_beta_log_space_by_hand():
    controller = BudgetBeta(beta=1.0, epsilon=2.0, lr=0.5)
    # KL 4: log β += 0.5·(4 − 2)/2 = 0.5  → β = e^0.5
    assert controller.update(4.0) == approx(math.exp(0.5))
    # KL 1: log β += 0.5·(1 − 2)/2 = −0.25 → β = e^0.25
    assert controller.update(1.0) == approx(math.exp(0.25))
    # KL 2 (on budget): unchanged; n_steps does not scale the dual step
    assert controller.update(2.0, n_steps=64) == approx(math.exp(0.25))


def test_budget_beta_linear_by_hand():
    controller = BudgetBeta(beta=1.0, epsilon=2.0, lr=0.5, log_space=False)
    assert controller.update(4.0) == approx(2.0)  # 1 + 0.5·(4 − 2)
    assert controller.update(0.0) == approx(1.0)  # 2 + 0.5·(0 − 2)
    assert controller.update(0.0) == approx(0.0)  # 1 − 1
    assert controller.update(0.0) == approx(0.0)  # max(0, 0 − 1): projected onto β ≥ 0
    assert controller.update(3.0) == approx(
        0.5
    )  # 0 + 0.5·(3 − 2): leaves 0 when the budget is broken


def test_budget_beta_validation_and_non_finite_kl():
    with pytest.raises(ValueError, match=r"kl_controller.epsilon must be > 0 \(got -1.0\)"):
        BudgetBeta(beta=1.0, epsilon=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="kl_controller.lr must be > 0"):
        BudgetBeta(beta=1.0, epsilon=1.0, lr=0.0)
    with pytest.raises(ValueError, match="kl_controller.beta must be > 0 with log_space=True"):
        BudgetBeta(beta=0.0, epsilon=1.0, lr=0.1)
    BudgetBeta(beta=0.0, epsilon=1.0, lr=0.1, log_space=False)  # fine in the linear form
    controller = BudgetBeta(beta=1.0, epsilon=1.0, lr=0.1)
    with pytest.raises(NumericalError, match="nan"):
        controller.update(float("nan"))
    assert controller.value == 1.0  # a bad measurement leaves β untouched
    runaway = BudgetBeta(beta=10.0, epsilon=1.0, lr=0.1)
    with pytest.raises(NumericalError, match="overflowed"):
        runaway.update(1e6)  # log β would grow by 0.1 · (1e6 − 1) ≈ 1e5


@pytest.mark.parametrize(
    "make",
    [
        lambda: FixedBeta(0.3),
        lambda: AdaptiveBeta(beta=0.1, target=6.0, horizon=1000),
        lambda: BudgetBeta(beta=0.2, epsilon=4.0, lr=0.3),
        lambda: BudgetBeta(beta=0.2, epsilon=4.0, lr=0.3, log_space=False),
    ],
)
def test_state_dict_round_trip(make):
    trained, restored = make(), make()
    for kl in (10.0, 2.0, 7.5):
        trained.update(kl, n_steps=32)
    restored.load_state_dict(trained.state_dict())
    assert restored.value == trained.value
    assert restored.update(5.0, n_steps=32) == trained.update(5.0, n_steps=32)


def test_load_state_dict_rejects_another_controller():
    with pytest.raises(ValueError, match="AdaptiveBeta state"):
        FixedBeta(0.1).load_state_dict(AdaptiveBeta(0.1, 1.0, 10).state_dict())
