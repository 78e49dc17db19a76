"""Exact evaluation on an enumerable task: every quantity of the objective, by enumeration.

At construction the reference is enumerated once (p_ref [P, N]) and the task's gold table is
standardised under it (mean 0, std 1 per prompt), so J(p_ref) = 0 and J* = β·mean log Z. All
`optimum/*` numbers are with respect to the gold table, the reward the closed form is about —
or to `rewards` when given: the DPO stage passes g/τ, the reward Bradley–Terry labels at
temperature τ identify, whose optimum at β is p_DPO* ∝ p_ref exp(g/(τβ)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.analysis.optimum import (
    enumerated_logprobs,
    expected_reward,
    kl_divergence,
    objective,
    optimal_frontier,
    optimal_logprobs,
    optimal_objective,
)

EXACT_REWARDS = ("gold", "preference")


def exact_rewards(task, scale: str = "gold") -> Tensor | None:
    """The reward table [P, N] the exact terms are about: None for "gold" (the task's table,
    standardised under p_ref by `OracleEvaluator`), g/τ for "preference" — the reward the
    Bradley–Terry labels at temperature τ identify (up to a per-prompt constant), which DPO's
    implicit reward and an un-normalised reward model estimate."""
    if scale not in EXACT_REWARDS:
        raise ValueError(f"exact reward scale {scale!r}: expected one of {list(EXACT_REWARDS)}")
    return None if scale == "gold" else task.raw_rewards() / task.temperature


def oracle_setup(task, tokenizer, reference, generation, scale: str | None = None):
    """On an enumerable task (one with `allowed_token_ids`): restrict `generation` (in place) to
    the task's response space — its allowed ids, exactly `task.length` new tokens — and return
    its `OracleEvaluator` against `reference`, about `exact_rewards(task, scale)` (None: the
    task's gold table). On any other task (or none): None, `generation` untouched.

    The one set-up of the policy stage, the DPO stage and `eval.py mode=policy`."""
    if task is None or not hasattr(task, "allowed_token_ids"):
        return None
    generation.allowed_token_ids = task.allowed_token_ids(tokenizer)
    generation.min_new_tokens = generation.max_new_tokens = task.length
    rewards = None if scale is None else exact_rewards(task, scale)
    return OracleEvaluator(task, tokenizer, reference, generation.temperature, rewards)


class OracleEvaluator:
    def __init__(self, task, tokenizer, reference, temperature: float = 1.0, rewards=None):
        self.task, self.tokenizer, self.temperature = task, tokenizer, temperature
        with torch.no_grad():
            self.ref_logprobs = enumerated_logprobs(reference, tokenizer, task, temperature)
        task.standardise(self.ref_logprobs)
        self.rewards = task.rewards() if rewards is None else rewards.float()  # [P, N]

    def policy_logprobs(self, policy, temperature: float | None = None) -> Tensor:
        """Exact log p_θ(y|u) [P, N], differentiable."""
        return enumerated_logprobs(
            policy, self.tokenizer, self.task, temperature or self.temperature
        )

    def terms(self, table: Tensor, beta: float) -> dict[str, Tensor]:
        """J(θ) (differentiable), E[r] and KL(p_θ‖p_ref), exact, averaged over prompts."""
        ref, rewards = self.ref_logprobs.to(table.device), self.rewards.to(table.device)
        return {
            "objective": objective(table, ref, rewards, beta),
            "reward": expected_reward(table, rewards).mean(),
            "kl": kl_divergence(table, ref).mean(),
        }

    @torch.no_grad()
    def summary(self, policy, beta: float) -> dict[str, float]:
        """Exact J, J*, gap, KL to p* and to p_ref of `policy` (floats, for logs and reports)."""
        table = self.policy_logprobs(policy).cpu()
        terms = self.terms(table, beta)
        star = optimal_logprobs(self.ref_logprobs, self.rewards, beta)
        j_star = float(optimal_objective(self.ref_logprobs, self.rewards, beta))
        return {
            "exact_objective": float(terms["objective"]),
            "exact_reward": float(terms["reward"]),
            "exact_kl": float(terms["kl"]),
            "objective_star": j_star,
            "optimum_gap": j_star - float(terms["objective"]),
            "kl_to_optimum": float(kl_divergence(table, star).mean()),
            "reference_objective": float(
                objective(self.ref_logprobs, self.ref_logprobs, self.rewards, beta)
            ),
        }

    def frontier(self, betas: list[float] | None = None) -> list[dict]:
        """The exact optimal reward–KL frontier {(KL(p*_β‖p_ref), E_{p*_β}[r])} over a β grid."""
        betas = betas or [float(b) for b in torch.logspace(-2.5, 1.5, 161)]
        return [
            {k: float(v) for k, v in point.items()}
            for point in optimal_frontier(self.ref_logprobs, self.rewards, betas)
        ]
