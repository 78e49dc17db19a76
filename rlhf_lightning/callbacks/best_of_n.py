"""`BestOfNCallback`: the best-of-n frontier of the SFT policy, once, before training.

Draws N samples per held-out prompt from the reference p_ref (the SFT policy), and for
n = 1, 2, 4, …, N computes the expected proxy and gold reward of the sample the proxy ranks best,
with the unbiased estimator over all n-subsets of the N samples, at KL_bon(n) = log n − (n−1)/n
(Stiennon et al. 2020, https://arxiv.org/abs/2009.01325; Gao et al. 2022,
https://arxiv.org/abs/2210.10760; maths in `rlhf_lightning.analysis.overoptimisation`).

The curve is kept as callback state (`curve`, saved in checkpoints, so a resumed run does not
recompute it) and drawn by `OverOptimisationCallback` next to the policy's trajectory: RL that
reaches a KL at which best-of-n does better has used its KL budget poorly. Logged: a wandb table
`best_of_n/curve`, and the scalars `best_of_n/proxy_max_n`, `best_of_n/gold_max_n` (at n = N),
`best_of_n/gold_peak` and `best_of_n/kl_at_gold_peak` (the n with the highest gold).
"""

from __future__ import annotations

import lightning as L

from rlhf_lightning.analysis.overoptimisation import best_of_n_curve, default_ns, measured_peak
from rlhf_lightning.callbacks.common import eval_prompts, log_metrics, shared_samples
from rlhf_lightning.errors import ConfigError


class BestOfNCallback(L.Callback):
    """n_prompts held-out prompts × n_samples (= N) reference samples each, at train start."""

    stages = ("policy",)

    def __init__(self, n_samples: int = 16, n_prompts: int = 32, seed: int = 0):
        if n_samples < 1:
            raise ConfigError(f"best-of-n needs n_samples >= 1, got {n_samples}")
        self.n_samples, self.n_prompts, self.seed = n_samples, n_prompts, seed
        self.curve: list[dict] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.curve or not trainer.is_global_zero:  # computed before a resume, or not rank 0
            return
        prompts = eval_prompts(trainer, self.n_prompts, type(self).__name__)
        samples = shared_samples(
            trainer, pl_module, pl_module.reference, prompts, self.n_samples, self.seed
        )
        n_prompts = len(prompts)
        proxy = samples["proxy"].view(n_prompts, self.n_samples)  # [P, N], grouped by prompt
        gold = samples["gold"]
        gold = None if gold is None else gold.view(n_prompts, self.n_samples)  # [P, N]
        self.curve = best_of_n_curve(proxy, gold, default_ns(self.n_samples))
        log_metrics(trainer, self._scalars(), trainer.global_step, self._table)

    def _scalars(self) -> dict[str, float]:
        last = self.curve[-1]
        scalars = {"best_of_n/proxy_max_n": last["proxy"]}
        peak = measured_peak(self.curve, "gold")
        if peak is not None:
            scalars["best_of_n/gold_max_n"] = last["gold"]
            scalars["best_of_n/gold_peak"] = peak["gold"]
            scalars["best_of_n/kl_at_gold_peak"] = peak["kl"]
        return scalars

    def _table(self) -> dict:
        import wandb

        columns = ["n", "kl", "sqrt_kl", "proxy_reward", "gold_reward"]
        rows = [[p["n"], p["kl"], p["sqrt_kl"], p["proxy"], p.get("gold")] for p in self.curve]
        return {"best_of_n/curve": wandb.Table(columns=columns, data=rows)}

    def state_dict(self) -> dict:
        return {"curve": list(self.curve)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.curve = list(state_dict.get("curve", []))
