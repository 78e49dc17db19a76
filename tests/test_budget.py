"""β controllers in the training loop on `task=oracle` (reward = the task's gold table).

BudgetBeta solves max E[r] s.t. KL ≤ ε by dual ascent on β; once settled, the exact KL(p_θ‖p_ref)
must sit on the budget. AdaptiveBeta (Ziegler et al. 2019) must raise β when KL runs above its
target and lower it when KL stays below, by the proportional rule worked out by hand.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from policy_helpers import CONF, algorithm_from_conf, build_module, build_oracle, train

from rlhf_lightning.analysis.optimum import optimal_frontier
from rlhf_lightning.control.beta import AdaptiveBeta, BudgetBeta

EPSILON = 1.0  # KL budget, nats per sequence
LR = 2e-3  # policy AdamW learning rate
PROMPTS_PER_STEP = 16  # × group_size (rloo: 4) samples per step


@pytest.fixture(scope="module")
def oracle():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine run many times slower
    yield build_oracle(seed=0)
    torch.set_num_threads(threads)


def _controller_conf(name: str) -> dict:
    node = OmegaConf.to_container(OmegaConf.load(CONF / "kl_controller" / f"{name}.yaml"))
    return {k: v for k, v in node.items() if k not in ("_target_", "beta")}


def _beta_at_budget(oracle, epsilon: float) -> float:
    """β whose closed-form optimum has KL(p*_β‖p_ref) = ε (bisection in log β; KL falls with β)."""
    ref, rewards = oracle.evaluator.ref_logprobs, oracle.evaluator.rewards
    low, high = 1e-3, 1e3
    for _ in range(60):
        mid = (low * high) ** 0.5
        kl = optimal_frontier(ref, rewards, [mid])[0]["kl"]
        low, high = (mid, high) if kl > epsilon else (low, mid)
    return (low * high) ** 0.5


class _ExactKL(L.Callback):
    """The exact KL(p_θ‖p_ref) every `every` steps from step `start` on."""

    def __init__(self, start: int, every: int):
        self.start, self.every, self.kls = start, every, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = batch_idx + 1
        if step >= self.start and step % self.every == 0:
            self.kls.append(module.exact.summary(module.policy, module.beta.value)["exact_kl"])


@pytest.mark.slow
def test_budget_beta_settles_on_the_kl_budget(oracle):
    """Dual ascent from β = 0.05 overshoots (KL ≈ 3 by step 70, β up to ≈ 1.5 by step 120) and
    settles by step ~210 (measured on AVX2 and AVX-512 hosts); the primal iterate keeps oscillating
    around ε (single readings 0.87–1.16 at steps 210–500), so the test judges the mean exact KL
    over the last 60 of 300 steps, not one end point — that one end point at step 200, still in
    the transient, was 0.74 on an AVX2 host (inside ε ± 25 % on the AVX-512 hosts before)."""
    settings = {**_controller_conf("budget"), "epsilon": EPSILON}
    controller = BudgetBeta(beta=0.05, **settings)  # 0.05: conf/algo/rloo.yaml's β
    module = build_module(oracle, algorithm_from_conf("rloo"), beta=controller, lr=LR)
    tail = _ExactKL(start=250, every=10)
    train(module, 300, PROMPTS_PER_STEP, callbacks=[tail])
    kl = sum(tail.kls) / len(tail.kls)
    target = _beta_at_budget(oracle, EPSILON)
    print(
        f"\nBudgetBeta ε={EPSILON} lr={settings['lr']}: exact KL over steps 250–300 "
        f"{[round(k, 3) for k in tail.kls]} (mean {kl:.3f}), β {controller.value:.3f} "
        f"(closed-form β with KL(p*‖p_ref) = ε: {target:.3f})"
    )
    assert len(tail.kls) == 6
    assert abs(kl - EPSILON) <= 0.1 * EPSILON
    assert 1 / 1.25 < controller.value / target < 1.25  # β is the constraint's multiplier


@pytest.mark.parametrize(("target", "rises"), [(0.05, True), (50.0, False)])
def test_adaptive_beta_moves_towards_its_target(oracle, target, rises):
    horizon, beta, steps = _controller_conf("adaptive")["horizon"], 0.1, 30
    controller = AdaptiveBeta(beta=beta, target=target, horizon=horizon)
    algorithm = algorithm_from_conf("rloo")
    module = build_module(oracle, algorithm, beta=controller, lr=LR)
    train(module, steps, PROMPTS_PER_STEP)
    step = 0.2 * PROMPTS_PER_STEP * algorithm.group_size / horizon  # saturated |e|·n_steps/horizon
    print(f"\nAdaptiveBeta target {target}: β {beta} -> {controller.value:.5f}")
    if rises:  # KL is 0 at the first step (p_θ = p_ref), far above 0.05 soon after
        assert beta < controller.value <= beta * (1 + step) ** steps
    else:  # KL never reaches 0.8·target: the error is clipped at −0.2 at every step
        assert controller.value == pytest.approx(beta * (1 - step) ** steps, rel=1e-9)
