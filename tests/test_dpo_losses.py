"""DPO, IPO and robust DPO losses (`losses/dpo.py`) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.losses.dpo import (
    dpo_loss,
    dpo_robust_loss,
    dpo_sigmoid_loss,
    implicit_accuracy,
    ipo_loss,
)

LOG2 = math.log(2)
# ρ⁺ = 1, ρ⁻ = −1, β = 0.5: βh = 1, −log σ(1) = log(1 + e^−1), −log σ(−1) = log(1 + e)
NLL_1, NLL_MINUS_1 = math.log1p(math.exp(-1)), math.log1p(math.e)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_sigmoid_by_hand():
    assert float(dpo_sigmoid_loss(t(1.0), t(-1.0), 0.5)[0]) == pytest.approx(0.3132617, abs=1e-7)
    smoothed = 0.9 * NLL_1 + 0.1 * NLL_MINUS_1  # cDPO, ε = 0.1: 0.4132617
    assert float(dpo_sigmoid_loss(t(1.0), t(-1.0), 0.5, 0.1)[0]) == pytest.approx(smoothed)
    # a target margin γ = 1 cancels βh = 1: log 2
    assert float(dpo_sigmoid_loss(t(1.0), t(-1.0), 0.5, margin=1.0)[0]) == pytest.approx(LOG2)


def test_robust_by_hand():
    expected = (0.9 * NLL_1 - 0.1 * NLL_MINUS_1) / 0.8  # 0.1882617
    assert float(dpo_robust_loss(t(1.0), t(-1.0), 0.5, 0.1)[0]) == pytest.approx(expected)
    assert expected == pytest.approx(0.1882617, abs=1e-7)
    # ε = 0 is DPO
    assert float(dpo_robust_loss(t(1.0), t(-1.0), 0.5, 0.0)[0]) == pytest.approx(NLL_1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_robust_loss(t(1.0), t(-1.0), 0.5, 0.5)


def test_ipo_by_hand():
    # ρ⁺/|y⁺| = 2/4, ρ⁻/|y⁻| = −1/2: h̄ = 1; β = 0.25: (1 − 1/(2β))² = (1 − 2)² = 1
    assert float(ipo_loss(t(2.0), t(-1.0), 0.25, t(4.0), t(2.0))[0]) == pytest.approx(1.0)
    # h̄ = 1/(2β) is IPO's target: loss 0
    assert float(ipo_loss(t(4.0), t(0.0), 0.5, t(4.0), t(3.0))[0]) == pytest.approx(0.0)


def test_at_the_reference_every_loss_has_its_known_start():
    zeros, lengths = torch.zeros(3), torch.tensor([3.0, 5.0, 1.0])
    for loss_type, smoothing, start in (
        ("sigmoid", 0.0, LOG2),
        ("sigmoid", 0.2, LOG2),
        ("robust", 0.2, LOG2),  # [(1−ε) − ε] log 2 / (1 − 2ε) = log 2
        ("ipo", 0.0, 1 / (4 * 0.1**2)),
    ):
        out = dpo_loss(zeros, zeros, zeros, zeros, 0.1, loss_type, smoothing, 0.0, lengths, lengths)
        assert float(out["loss"]) == pytest.approx(start), loss_type
    assert float(implicit_accuracy(zeros, zeros)) == 0.5  # ties count ½


def test_dpo_loss_terms_and_gradient_sign():
    policy_chosen = torch.tensor([-2.0, -3.0], requires_grad=True)
    policy_rejected = torch.tensor([-2.5, -1.0], requires_grad=True)
    out = dpo_loss(policy_chosen, policy_rejected, t(-2.0, -2.0), t(-2.0, -2.0), beta=2.0)
    assert out["logratio_chosen"].tolist() == [0.0, -1.0]
    assert out["logratio_rejected"].tolist() == [-0.5, 1.0]
    assert out["reward_chosen"].tolist() == [0.0, -2.0]  # β ρ⁺
    # pair 1: βh = 1 → log(1 + e^−1); pair 2: βh = −4 → log(1 + e^4)
    expected = (NLL_1 + math.log1p(math.exp(4))) / 2
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-6)
    assert float(implicit_accuracy(out["reward_chosen"], out["reward_rejected"])) == 0.5
    out["loss"].backward()
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()  # y⁺ up, y⁻ down


def test_unknown_loss_and_missing_lengths_fail():
    zeros = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(zeros, zeros, zeros, zeros, 0.1, "hinge")
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(zeros, zeros, zeros, zeros, 0.1, "ipo")
