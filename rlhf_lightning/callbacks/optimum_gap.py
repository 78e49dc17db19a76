"""`OptimumGapCallback`: on an enumerable task, the exact distance of the policy to the optimum.

With the response space enumerated (`module.exact`, an `OracleEvaluator`), the objective
J(θ) = mean_u (E_{p_θ}[r] − β KL(p_θ ‖ p_ref)) and its optimum J* = β mean_u log Z(u) at
p* ∝ p_ref exp(r/β) are exact (Korbak et al. 2022, https://arxiv.org/abs/2205.11275), and
J* − J(θ) = β mean_u KL(p_θ ‖ p*). Logged every `every_n_steps`, at the current β:

    optimum/objective  J(θ)       optimum/objective_star  J*       optimum/gap  J* − J(θ)
    optimum/kl_to_optimum  mean_u KL(p_θ ‖ p*)      optimum/kl  mean_u KL(p_θ ‖ p_ref)
    optimum/reward  mean_u E_{p_θ}[r]

A no-op when the task is not enumerable (`module.exact is None`).
"""

from __future__ import annotations

import lightning as L

from rlhf_lightning.callbacks.common import EvalCallback, evaluation_mode, log_metrics

# OracleEvaluator.summary key -> logged key
KEYS = {
    "exact_objective": "optimum/objective",
    "objective_star": "optimum/objective_star",
    "optimum_gap": "optimum/gap",
    "kl_to_optimum": "optimum/kl_to_optimum",
    "exact_kl": "optimum/kl",
    "exact_reward": "optimum/reward",
}


class OptimumGapCallback(EvalCallback):
    """Exact J, J*, gap and KLs of the policy on enumerable tasks (no sampling)."""

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        exact = getattr(module, "exact", None)
        if exact is None:
            return
        with evaluation_mode(module.policy, seed=0):
            summary = exact.summary(module.policy, float(module.beta.value))
        log_metrics(
            trainer, {KEYS[k]: v for k, v in summary.items() if k in KEYS}, trainer.global_step
        )
