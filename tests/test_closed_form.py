"""Sampled optimisers against the closed form on `task=oracle`.

J* = β·mean_u log Z(u) is the best any policy can do (J(p) = J* − β·KL(p‖p*)). A policy network
is not a table, so the reference for what the network and optimiser can reach is `algo=exact`:
gradient ascent on the enumerated J(θ). Every run starts from the same θ (the reference), with the
same AdamW, learning rate and number of training steps (one rollout and update each); the shipped
conf/algo/*.yaml defaults are used as they are. Each sampled algorithm must close at least 90 % of
the gap that exact ascent closes: closure(J_ref, J_end, J*) = (J_end − J_ref)/(J* − J_ref).
"""

from __future__ import annotations

import time

import pytest
import torch
from policy_helpers import (
    algorithm_from_conf,
    build_module,
    build_oracle,
    closed,
    exact_summary,
    train,
)

from rlhf_lightning.analysis.optimum import optimal_frontier

BETAS = (0.1, 1.0)
ALGORITHMS = ("exact", "rloo", "ppo")
LR = 2e-3  # AdamW, as conf/policy/default.yaml otherwise (betas 0.9/0.95, no weight decay)
STEPS = 100  # training steps: one rollout each (ppo takes epochs × minibatches updates per step)
PROMPTS_PER_STEP = 64  # × group_size (rloo, ppo: 4) samples per step


@pytest.fixture(scope="module")
def runs() -> dict[tuple[float, str], dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine run many times slower
    oracle = build_oracle(seed=0)
    results = {}
    for beta in BETAS:
        for name in ALGORITHMS:
            start = time.perf_counter()
            module = build_module(oracle, algorithm_from_conf(name), beta=beta, lr=LR, seed=0)
            before = exact_summary(module, beta)
            train(module, STEPS, PROMPTS_PER_STEP, seed=0)
            after = exact_summary(module, beta)
            results[beta, name] = {
                "before": before,
                "after": after,
                "closure": closed(before, after),
                "seconds": time.perf_counter() - start,
            }
    torch.set_num_threads(threads)
    ref, rewards = oracle.evaluator.ref_logprobs, oracle.evaluator.rewards
    print(f"\n{STEPS} steps, AdamW lr {LR}, {PROMPTS_PER_STEP} prompts per step")
    print(
        f"{'β':>5s} {'algo':6s} {'J_ref':>7s} {'J_end':>7s} {'J*':>7s} {'closure':>8s} "
        f"{'÷exact':>7s} {'KL':>6s} {'KL*':>6s} {'KL‖p*':>6s} {'s':>5s}"
    )
    for (beta, name), r in results.items():
        ratio = r["closure"] / results[beta, "exact"]["closure"]
        star_kl = optimal_frontier(ref, rewards, [beta])[0]["kl"]  # KL(p*‖p_ref)
        print(
            f"{beta:5.2f} {name:6s} {r['before']['exact_objective']:7.3f} "
            f"{r['after']['exact_objective']:7.3f} {r['after']['objective_star']:7.3f} "
            f"{r['closure']:8.3f} {ratio:7.3f} {r['after']['exact_kl']:6.3f} {star_kl:6.3f} "
            f"{r['after']['kl_to_optimum']:6.3f} "
            f"{r['seconds']:5.1f}"
        )
    return results


@pytest.mark.slow
@pytest.mark.parametrize("beta", BETAS)
def test_exact_ascent_reaches_the_optimum(runs, beta):
    run = runs[beta, "exact"]
    assert run["after"]["exact_objective"] <= run["after"]["objective_star"] + 1e-5
    assert run["closure"] > 0.7  # the network can stall short of J* (seed 3, β=0.1: 0.78)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rloo", "ppo"])
@pytest.mark.parametrize("beta", BETAS)
def test_sampled_algorithm_closes_most_of_what_exact_closes(runs, beta, name):
    ratio = runs[beta, name]["closure"] / runs[beta, "exact"]["closure"]
    assert (
        runs[beta, name]["after"]["exact_objective"]
        <= runs[beta, name]["after"]["objective_star"] + 1e-5
    )
    assert ratio >= 0.9, f"{name} at β={beta} closes {ratio:.1%} of what exact ascent closes"


@pytest.mark.slow
@pytest.mark.parametrize("name", ALGORITHMS)
def test_larger_beta_stays_closer_to_the_reference(runs, name):
    low, high = (runs[beta, name]["after"]["exact_kl"] for beta in BETAS)
    assert high < low
