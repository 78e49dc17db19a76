"""Loss functions against values worked out by hand (float64 throughout)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.losses import (
    bradley_terry_loss,
    gae,
    grpo_advantages,
    kl_penalized_scores,
    kl_per_token,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_gradient_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_advantages,
    rloo_advantages,
    sequence_kl,
    token_rewards,
)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    torch.testing.assert_close(actual, t(expected), atol=atol, rtol=0)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---- masked helpers ---------------------------------------------------------------------------


def test_masked_reductions_ignore_padding():
    x = t([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    close(masked_sum(x, mask), 7.0)  # 1 + 2 + 4
    close(masked_mean(x, mask), 7.0 / 3)
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    close(masked_sum(x, mask.bool(), dim=1), [3.0, 4.0])
    # population variance of {1, 2, 4}: mean 7/3, squared deviations 16/9, 1/9, 25/9 → 42/27
    close(masked_var(x, mask), 42 / 27)
    close(masked_var(x, mask, unbiased=True), 42 / 27 * 3 / 2)


def test_masked_mean_of_empty_mask_is_zero_with_finite_grad():
    x = t([[1.0, 2.0], [3.0, 4.0]]).requires_grad_()
    mask = t([[1, 1], [0, 0]])
    per_row = masked_mean(x, mask, dim=1)
    close(per_row.detach(), [1.5, 0.0])
    per_row.sum().backward()
    close(x.grad, [[0.5, 0.5], [0.0, 0.0]])


def test_masked_whiten():
    x = t([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    whitened = masked_whiten(x, mask)
    std = math.sqrt(42 / 27 + 1e-8)  # eps inside the square root
    close(whitened[mask.bool()], [(1 - 7 / 3) / std, (2 - 7 / 3) / std, (4 - 7 / 3) / std])
    unshifted = masked_whiten(x, mask, shift_mean=False)
    close(
        unshifted[mask.bool()],
        [(1 - 7 / 3) / std + 7 / 3, (2 - 7 / 3) / std + 7 / 3, (4 - 7 / 3) / std + 7 / 3],
    )


# ---- Bradley–Terry ----------------------------------------------------------------------------


def test_bradley_terry_by_hand():
    chosen, rejected = t([1.0, 0.0]), t([0.0, 0.0])
    # −(log σ(1) + log σ(0)) / 2 = (0.3132617 + 0.6931472) / 2
    expected = -(log_sigmoid(1.0) + log_sigmoid(0.0)) / 2
    close(bradley_terry_loss(chosen, rejected), expected)
    assert abs(expected - 0.5032044) < 1e-7
    # margin m = [0.5, −1]: logits 1 − 0.5 = 0.5 and 0 + 1 = 1
    close(
        bradley_terry_loss(chosen, rejected, margin=t([0.5, -1.0])),
        -(log_sigmoid(0.5) + log_sigmoid(1.0)) / 2,
    )
    # centering 0.01 adds 0.01 · mean((1+0)², (0+0)²) = 0.01 · 0.5 = 0.005
    close(bradley_terry_loss(chosen, rejected, centering=0.01), expected + 0.005)


def test_bradley_terry_gradient_and_stability():
    chosen = t([2.0]).requires_grad_()
    bradley_terry_loss(chosen, t([0.0])).backward()
    close(chosen.grad, [-(1 - 1 / (1 + math.exp(-2.0)))])  # d/dr⁺ −log σ(Δ) = −(1 − σ(Δ))
    # a badly wrong pair costs |Δ| and stays finite (naive log(sigmoid(−1000)) would be −inf)
    close(bradley_terry_loss(t([-1000.0]), t([0.0])), 1000.0)
    close(bradley_terry_loss(t([1000.0]), t([0.0])), 0.0)


# ---- KL estimators ----------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logprobs, ref = t([[math.log(0.5), 0.0]]), t([[math.log(0.25), 0.0]])  # l = [ln 2, 0]
    ln2 = math.log(2.0)
    close(kl_per_token(logprobs, ref, "k1"), [[ln2, 0.0]])
    close(kl_per_token(logprobs, ref, "k2"), [[ln2**2 / 2, 0.0]])
    close(kl_per_token(logprobs, ref, "k3"), [[0.5 - 1 + ln2, 0.0]])  # exp(−ln 2) − 1 + ln 2


def test_k1_and_k3_are_unbiased_and_k3_nonnegative():
    p, q = t([0.5, 0.3, 0.2]), t([0.2, 0.2, 0.6])  # policy p, reference q
    exact = float((p * (p / q).log()).sum())  # KL(p‖q) = 0.5 ln 2.5 + 0.3 ln 1.5 + 0.2 ln(1/3)
    assert abs(exact - (0.5 * math.log(2.5) + 0.3 * math.log(1.5) + 0.2 * math.log(1 / 3))) < 1e-12
    # enumerate the three outcomes as a [1, 3] "batch of tokens" and average with weights p
    logp, logq = p.log().unsqueeze(0), q.log().unsqueeze(0)
    for estimator in ("k1", "k3"):
        expectation = float((kl_per_token(logp, logq, estimator)[0] * p).sum())
        assert abs(expectation - exact) < 1e-12, estimator
    k2 = float((kl_per_token(logp, logq, "k2")[0] * p).sum())
    assert abs(k2 - exact) > 1e-3  # k2 is biased here
    log_ratios = torch.linspace(-20, 20, 401, dtype=torch.float64).unsqueeze(0)
    assert (kl_per_token(log_ratios, torch.zeros_like(log_ratios), "k3") >= 0).all()


def test_unknown_estimator_names_the_valid_ones():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_per_token(t([[0.0]]), t([[0.0]]), "k4")


def test_sequence_kl_and_penalized_scores():
    kl_tokens = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    close(sequence_kl(kl_tokens, mask), [0.6, 0.9])
    # score − β·KL with β = 0.5: 2 − 0.3 = 1.7 and −1 − 0.45 = −1.45
    close(kl_penalized_scores(t([2.0, -1.0]), kl_tokens, mask, beta=0.5), [1.7, -1.45])


# ---- advantages -------------------------------------------------------------------------------


def test_gae_by_hand_full_and_padded_rows():
    # γ = 0.9, λ = 0.8, γλ = 0.72
    # row 0, no padding: r = [1, 0, 2], V = [0.5, 1.0, 1.5]
    #   δ2 = 2 + 0.9·0 − 1.5 = 0.5                     A2 = 0.5
    #   δ1 = 0 + 0.9·1.5 − 1.0 = 0.35                  A1 = 0.35 + 0.72·0.5 = 0.71
    #   δ0 = 1 + 0.9·1.0 − 0.5 = 1.4                   A0 = 1.4 + 0.72·0.71 = 1.9112
    # row 1, last position padding (junk 99 / 77 must be ignored): r = [1, 3], V = [0.5, 1.0]
    #   δ1 = 3 + 0 − 1.0 = 2.0                         A1 = 2.0
    #   δ0 = 1 + 0.9·1.0 − 0.5 = 1.4                   A0 = 1.4 + 0.72·2.0 = 2.84
    rewards = t([[1.0, 0.0, 2.0], [1.0, 3.0, 99.0]])
    values = t([[0.5, 1.0, 1.5], [0.5, 1.0, 77.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[1.9112, 0.71, 0.5], [2.84, 2.0, 0.0]])
    close(returns, [[2.4112, 1.71, 2.0], [3.34, 3.0, 0.0]])  # A + V, 0 on padding


def test_gae_limits():
    rewards, values = t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3)
    # λ = 1, γ = 1: A_t = Σ_{s≥t} r_s − V_t = [3 − 0.5, 2 − 1, 2 − 1.5]
    close(gae(rewards, values, mask, gamma=1.0, lam=1.0)[0], [[2.5, 1.0, 0.5]])
    # λ = 0: A_t = δ_t = [1 + 0.9 − 0.5, 0 + 1.35 − 1, 2 − 1.5]
    close(gae(rewards, values, mask, gamma=0.9, lam=0.0)[0], [[1.4, 0.35, 0.5]])


def test_gae_rejects_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        gae(t([[0.0, 1.0]]), t([[0.0, 0.0]]), t([[0, 1]]), gamma=1.0, lam=1.0)


def test_rloo_by_hand():
    scores = t([1.0, 2.0, 3.0, 6.0])
    # k = 2, groups [1, 2], [3, 6]: a_i = s_i − other = [1−2, 2−1, 3−6, 6−3]
    close(rloo_advantages(scores, 2), [-1.0, 1.0, -3.0, 3.0])
    # k = 4, sum 12: a_i = s_i − (12 − s_i)/3 = [1 − 11/3, 2 − 10/3, 3 − 3, 6 − 2]
    close(rloo_advantages(scores, 4), [-8 / 3, -4 / 3, 0.0, 4.0])


def test_grpo_by_hand():
    scores = t([1.0, 2.0, 3.0, 6.0])
    # k = 4: mean 3, deviations [−2, −1, 0, 3], unbiased var = (4+1+0+9)/3 = 14/3
    std = math.sqrt(14 / 3)
    close(grpo_advantages(scores, 4), [d / (std + 1e-6) for d in (-2, -1, 0, 3)])
    # k = 2: group [1, 2]: mean 1.5, unbiased std sqrt(0.5); group [3, 6]: mean 4.5, std sqrt(4.5)
    expected = [-0.5 / (math.sqrt(0.5) + 1e-6), 0.5 / (math.sqrt(0.5) + 1e-6)]
    expected += [-1.5 / (math.sqrt(4.5) + 1e-6), 1.5 / (math.sqrt(4.5) + 1e-6)]
    close(grpo_advantages(scores, 2), expected)
    close(grpo_advantages(scores, 2, scale=False), [-0.5, 0.5, -1.5, 1.5])
    close(grpo_advantages(t([5.0, 5.0]), 2), [0.0, 0.0])  # equal scores: no signal, no NaN


def test_reinforce_baselines():
    scores = t([1.0, 2.0, 3.0, 6.0])
    close(reinforce_advantages(scores), [-2.0, -1.0, 0.0, 3.0])  # mean 3
    close(reinforce_advantages(scores, baseline="none"), [1.0, 2.0, 3.0, 6.0])
    with pytest.raises(ValueError, match="batch_mean, none"):
        reinforce_advantages(scores, baseline="critic")


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_estimators_validate_group_size(fn):
    with pytest.raises(ValueError, match="group_size >= 2"):
        fn(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="not divisible by group_size 2"):
        fn(t([1.0, 2.0, 3.0]), 2)


# ---- policy losses ----------------------------------------------------------------------------


def test_policy_gradient_loss_and_gradient():
    logprobs = t([[-1.0, -2.0, -5.0]]).requires_grad_()
    mask = t([[1, 1, 0]])
    advantages = t([2.0]).requires_grad_()  # sequence-level, broadcast over tokens
    loss = policy_gradient_loss(logprobs, advantages, mask)
    close(loss.detach(), -(2 * -1.0 + 2 * -2.0) / 2)  # = 3
    loss.backward()
    close(logprobs.grad, [[-1.0, -1.0, 0.0]])  # −A / n_tokens on real tokens
    assert advantages.grad is None  # advantages are detached


def test_ppo_policy_loss_with_clipping():
    # ε = 0.2; ratios ρ = [1.5, 0.9, 0.5, 0.5, e³ (padding)], A = [1, 1, −1, 1, 5]
    #   t0: −Aρ = −1.5, −A·clip = −1.2 → max −1.2 (clipped)
    #   t1: −0.9, −0.9 (ρ inside [0.8, 1.2])  → −0.9 (not clipped)
    #   t2: +0.5, +0.8                         → 0.8 (clipped)
    #   t3: −0.5, −0.8                         → −0.5 (not clipped: the pessimistic term is ρ)
    # loss = (−1.2 − 0.9 + 0.8 − 0.5) / 4 = −0.45; clipfrac = 2/4
    log_ratios = [math.log(1.5), math.log(0.9), math.log(0.5), math.log(0.5), 3.0]
    old = t([[-1.0] * 5])
    logprobs = (old + t([log_ratios])).requires_grad_()
    mask = t([[1, 1, 1, 1, 0]])
    loss, clipfrac, approx_kl = ppo_policy_loss(
        logprobs, old, t([[1.0, 1.0, -1.0, 1.0, 5.0]]), mask, 0.2
    )
    close(loss.detach(), -0.45)
    close(clipfrac, 0.5)
    close(approx_kl, 0.5 * sum(x**2 for x in log_ratios[:4]) / 4)  # ≈ 0.142051
    assert not approx_kl.requires_grad and not clipfrac.requires_grad
    loss.backward()
    # d/dlogp of −Aρ is −Aρ; clipped tokens get 0: [0, −0.9/4, 0, −0.5/4, 0]
    close(logprobs.grad, [[0.0, -0.225, 0.0, -0.125, 0.0]])


def test_ppo_policy_loss_without_clipping_is_the_policy_gradient():
    # ρ = 1 everywhere (first epoch): loss = −mean(A), clipfrac 0, approx_kl 0
    logprobs = t([[-1.0, -2.0]])
    loss, clipfrac, approx_kl = ppo_policy_loss(
        logprobs, logprobs.clone(), t([[3.0, -1.0]]), torch.ones(1, 2), 0.2
    )
    close(loss, -1.0)
    close(clipfrac, 0.0)
    close(approx_kl, 0.0)


def test_ppo_value_loss_by_hand():
    # c = 0.2, V_old = 1 everywhere
    #   t0: V = 1.5, R = 2: (V−R)² = 0.25, V_clip = 1.2, (1.2−2)² = 0.64 → 0.64 (clipped)
    #   t1: V = 0.9, R = 0: 0.81, V_clip = 0.9 → 0.81 (not clipped)
    #   t2: V = 0.5, R = 1: 0.25, V_clip = 0.8, 0.04 → 0.25 (not clipped)
    #   t3: padding
    # loss = 0.5 · (0.64 + 0.81 + 0.25) / 3 = 0.283333…, clipfrac = 1/3
    values = t([[1.5, 0.9, 0.5, 50.0]])
    old_values = t([[1.0, 1.0, 1.0, 1.0]])
    returns = t([[2.0, 0.0, 1.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    loss, clipfrac = ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    close(loss, 0.5 * 1.7 / 3)
    close(clipfrac, 1 / 3)


def test_token_rewards_on_padded_batch():
    # β = 0.5: −β·kl on each real token, score added on the last real token, 0 on padding
    #   row 0 (no padding): [−0.05, −0.1, −0.15 + 2] ; row 1 (length 2): [−0.2, −0.25 − 1, 0]
    #   row 2 (length 1):   [−0.05 + 0.5, 0, 0]
    scores = t([2.0, -1.0, 0.5])
    kl_tokens = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [0.1, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    close(
        token_rewards(scores, kl_tokens, mask, beta=0.5),
        [[-0.05, -0.1, 1.85], [-0.2, -1.25, 0.0], [0.45, 0.0, 0.0]],
    )
    with pytest.raises(ValueError, match="at least one response token"):
        token_rewards(scores[:1], kl_tokens[:1], t([[0, 0, 0]]), beta=0.5)
