"""`OverOptimisationCallback`: proxy and gold reward against sqrt(KL) in training; a Gao fit.

Every `every_n_steps` it samples the policy on held-out prompts and records the point
(step, KL, sqrt KL, proxy, gold); the points are callback state, so a resumed run keeps them.
It logs `eval/proxy_reward`, `eval/gold_reward`, `eval/kl`, `eval/sqrt_kl` (the last two only
when no `KLCallback` with the same samples logs them already) and, to wandb, a table
of all points so far (`overopt/points`) and a line chart of reward against sqrt KL
(`overopt/curve`: proxy, gold and the best-of-n curves of `BestOfNCallback` when present).

At the end of training it fits Gao et al. 2022's RL form (https://arxiv.org/abs/2210.10760) to the
gold reward relative to the initial policy's, R(d) = d (α − b log d) with d = sqrt(KL), and logs
`overopt/alpha`, `overopt/b`, `overopt/kl_at_fitted_peak` (d*² with d* = exp(α/b − 1), only when
b > 0), `overopt/kl_at_measured_peak`, `overopt/gold_at_peak` and `overopt/gold_final`. It writes
`overoptimisation.png` (matplotlib) and `overoptimisation.json` (points, best-of-n curve, fit) into
`trainer.default_root_dir`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch

from rlhf_lightning.analysis.overoptimisation import GaoFit, fit_gao_rl, measured_peak
from rlhf_lightning.callbacks.best_of_n import BestOfNCallback
from rlhf_lightning.callbacks.common import EvalCallback, eval_prompts, log_metrics, shared_samples
from rlhf_lightning.callbacks.kl import KLCallback

PLOT_FILE, DATA_FILE = "overoptimisation.png", "overoptimisation.json"


class OverOptimisationCallback(EvalCallback):
    """n_prompts × samples_per_prompt policy samples per evaluation. `points` holds the curve."""

    def __init__(
        self,
        every_n_steps: int = 10,
        n_prompts: int = 64,
        samples_per_prompt: int = 1,
        seed: int = 0,
        at_start: bool = True,
        at_end: bool = True,
        plot: bool = True,
    ):
        super().__init__(every_n_steps, at_start, at_end)
        self.n_prompts, self.samples_per_prompt, self.seed = n_prompts, samples_per_prompt, seed
        self.plot = plot
        self.points: list[dict] = []

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        prompts = eval_prompts(trainer, self.n_prompts, type(self).__name__)
        samples = shared_samples(
            trainer, module, module.policy, prompts, self.samples_per_prompt, self.seed
        )
        kl = float(samples["kl"].mean())
        point = {
            "step": trainer.global_step,
            "kl": kl,
            "sqrt_kl": math.sqrt(max(kl, 0.0)),
            "proxy": float(samples["proxy"].mean()),
            "gold": None if samples["gold"] is None else float(samples["gold"].mean()),
        }
        self.points.append(point)
        scalars = {"eval/proxy_reward": point["proxy"]}
        if not self._kl_logged_by(trainer.callbacks):
            scalars.update({"eval/kl": kl, "eval/sqrt_kl": point["sqrt_kl"]})
        if point["gold"] is not None:
            scalars["eval/gold_reward"] = point["gold"]
        log_metrics(trainer, scalars, trainer.global_step, lambda: self._wandb_tables(trainer))

    def _kl_logged_by(self, callbacks: list) -> bool:
        """A `KLCallback` with the same samples logs the same eval/kl: do not log it twice."""
        settings = ("every_n_steps", "n_prompts", "samples_per_prompt", "seed", "at_start")
        return any(
            isinstance(c, KLCallback) and all(getattr(c, k) == getattr(self, k) for k in settings)
            for c in callbacks
        )

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.is_global_zero and self.points:
            self.summarise(trainer)

    def summarise(self, trainer: L.Trainer) -> dict[str, float]:
        """Fit, log and save the curve; returns the logged `overopt/*` numbers."""
        bon = best_of_n_curve(trainer)
        baseline = self.baseline_gold(bon)
        fit = None
        if baseline is not None:
            later = [p for p in self.points if p["step"] > 0 and p["gold"] is not None]
            fit = fit_gao_rl([p["sqrt_kl"] for p in later], [p["gold"] - baseline for p in later])
        scalars = self._summary(fit)
        log_metrics(trainer, scalars, trainer.global_step)
        out = Path(trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "points": self.points,
            "best_of_n": bon,
            "baseline_gold": baseline,
            "fit": None if fit is None else {"alpha": fit.alpha, "b": fit.b},
        }
        (out / DATA_FILE).write_text(json.dumps(record, indent=2))
        if self.plot:
            plot_overoptimisation(self.points, bon, fit, baseline, out / PLOT_FILE)
            log_metrics(trainer, {}, trainer.global_step, lambda: _image(out / PLOT_FILE))
        return scalars

    def baseline_gold(self, bon: list[dict] | None) -> float | None:
        """Gold reward of the initial policy: the step-0 point, else best-of-1 (same policy)."""
        start = [p for p in self.points if p["step"] == 0 and p["gold"] is not None]
        if start:
            return start[0]["gold"]
        if bon and "gold" in bon[0]:
            return bon[0]["gold"]
        return None

    def _summary(self, fit: GaoFit | None) -> dict[str, float]:
        scalars = {"overopt/proxy_final": self.points[-1]["proxy"]}
        peak = measured_peak(self.points, "gold")
        if peak is not None:
            scalars["overopt/kl_at_measured_peak"] = peak["kl"]
            scalars["overopt/gold_at_peak"] = peak["gold"]
            scalars["overopt/gold_final"] = self.points[-1]["gold"]
        if fit is not None:
            scalars["overopt/alpha"], scalars["overopt/b"] = fit.alpha, fit.b
            if fit.peak_kl is not None and math.isfinite(fit.peak_kl):
                scalars["overopt/kl_at_fitted_peak"] = fit.peak_kl
        return scalars

    def _wandb_tables(self, trainer: L.Trainer) -> dict:
        import wandb

        columns = ["step", "kl", "sqrt_kl", "proxy_reward", "gold_reward"]
        points = wandb.Table(
            columns=columns,
            data=[[p["step"], p["kl"], p["sqrt_kl"], p["proxy"], p["gold"]] for p in self.points],
        )
        rows = [
            [p["sqrt_kl"], p[k], k]
            for p in self.points
            for k in ("proxy", "gold")
            if p[k] is not None
        ]
        for p in best_of_n_curve(trainer) or []:
            rows += [[p["sqrt_kl"], p[k], f"best-of-n {k}"] for k in ("proxy", "gold") if k in p]
        curve = wandb.Table(columns=["sqrt_kl", "reward", "series"], data=rows)
        chart = wandb.plot.line(
            curve,
            "sqrt_kl",
            "reward",
            stroke="series",
            title="Reward vs sqrt KL(policy || reference)",
        )
        return {"overopt/points": points, "overopt/curve": chart}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "points": list(self.points)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.points = list(state_dict.get("points", []))


def best_of_n_curve(trainer: L.Trainer) -> list[dict] | None:
    """The curve of a `BestOfNCallback` on the same trainer, if any computed one."""
    for callback in trainer.callbacks:
        if isinstance(callback, BestOfNCallback) and callback.curve:
            return callback.curve
    return None


def plot_overoptimisation(
    points: list[dict],
    bon: list[dict] | None,
    fit: GaoFit | None,
    baseline: float | None,
    path: Path,
) -> None:
    """Proxy and gold against sqrt KL (policy trajectory, best-of-n, Gao fit) as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    x = [p["sqrt_kl"] for p in points]
    ax.plot(x, [p["proxy"] for p in points], "o-", color="tab:blue", label="proxy (policy)")
    if any(p["gold"] is not None for p in points):
        gold = [math.nan if p["gold"] is None else p["gold"] for p in points]
        ax.plot(x, gold, "s-", color="tab:orange", label="gold (policy)")
    if bon:
        bx = [p["sqrt_kl"] for p in bon]
        ax.plot(bx, [p["proxy"] for p in bon], "^:", color="tab:blue", label="proxy (best-of-n)")
        if "gold" in bon[0]:
            ax.plot(
                bx, [p["gold"] for p in bon], "^:", color="tab:orange", label="gold (best-of-n)"
            )
    if fit is not None and baseline is not None:
        grid = torch.linspace(0, max(x + [1e-3]) * 1.1, 200, dtype=torch.float64)
        ax.plot(
            grid.tolist(),
            (baseline + fit(grid)).tolist(),
            "--",
            color="tab:red",
            label=f"Gao fit: d(α − b log d), α={fit.alpha:.3g}, b={fit.b:.3g}",
        )
    ax.set_xlabel("sqrt KL(p_θ ‖ p_ref)  [nats^½]")
    ax.set_ylabel("reward")
    ax.set_title("Reward over-optimisation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _image(path: Path) -> dict:
    import wandb

    return {"overopt/plot": wandb.Image(str(path))}
