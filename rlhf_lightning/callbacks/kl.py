"""`KLCallback`: KL(p_θ ‖ p_ref) on held-out prompts, per sequence and per token, k1 and k3.

From samples y ~ p_θ(·|u) with per-token log-ratio l_t = log p_θ(y_t|·) − log p_ref(y_t|·)
(Schulman 2020, http://joschu.net/blog/kl-approx.html):

    eval/kl          = mean_y Σ_t l_t                       (k1, unbiased)
    eval/kl_k3       = mean_y Σ_t (exp(−l_t) − 1 + l_t)      (k3, unbiased, ≥ 0 per sample)
    eval/kl_per_token = Σ_y Σ_t l_t / Σ_y |y|                (k1 per response token)
    eval/sqrt_kl     = sqrt(max(eval/kl, 0))                 (the x-axis of Gao et al. 2022)

Weights & Biases also gets `eval/kl_histogram`, the per-sequence k1 KL of the samples.
"""

from __future__ import annotations

import math

import lightning as L

from rlhf_lightning.callbacks.common import EvalCallback, eval_prompts, log_metrics, shared_samples


class KLCallback(EvalCallback):
    """n_prompts: held-out prompts used; samples_per_prompt: responses drawn for each."""

    def __init__(
        self,
        every_n_steps: int = 10,
        n_prompts: int = 64,
        samples_per_prompt: int = 1,
        seed: int = 0,
        at_start: bool = True,
        at_end: bool = True,
    ):
        super().__init__(every_n_steps, at_start, at_end)
        self.n_prompts, self.samples_per_prompt, self.seed = n_prompts, samples_per_prompt, seed

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        prompts = eval_prompts(trainer, self.n_prompts, type(self).__name__)
        samples = shared_samples(
            trainer, module, module.policy, prompts, self.samples_per_prompt, self.seed
        )
        kl = samples["kl"]  # [B] k1 per sequence
        mean_kl = float(kl.mean())
        scalars = {
            "eval/kl": mean_kl,
            "eval/kl_k3": float(samples["kl_k3"].mean()),
            "eval/kl_per_token": float(kl.sum() / samples["length"].sum().clamp_min(1)),
            "eval/sqrt_kl": math.sqrt(max(mean_kl, 0.0)),
        }

        def histogram() -> dict:
            import wandb

            return {"eval/kl_histogram": wandb.Histogram(kl.numpy())}

        log_metrics(trainer, scalars, trainer.global_step, histogram)
