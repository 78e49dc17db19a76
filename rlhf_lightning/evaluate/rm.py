"""`mode=rm`: a reward model on preference pairs — accuracy, calibration, and on built-in tasks
agreement with gold and the Bayes ceiling.

The RM's raw Bradley–Terry margin Δ = r⁺ − r⁻ is a probability statement, P(chosen ≻ rejected) =
σ(Δ); calibration compares σ(|Δ|) with how often the RM's preferred response is the labelled one
(`stats.pairwise_confidence`, ECE). On a built-in task the labels are Bradley–Terry samples under
gold at temperature τ, so no judge can beat the Bayes accuracy σ(|g⁺ − g⁻| / τ) per pair on
average, and agreement with gold (the RM prefers the higher-gold response) is what it learnt.
"""

from __future__ import annotations

import numpy as np

from rlhf_lightning.evaluate import stats
from rlhf_lightning.evaluate.context import EvalContext


def evaluate_reward_model(ctx: EvalContext) -> dict:
    """Everything `mode=rm` reports (JSON-ready)."""
    cfg = ctx.cfg
    judge = ctx.reward_model()
    pairs = ctx.pairs()
    prompts = [p.prompt for p in pairs]
    print(
        f"[eval] scoring {len(pairs)} preference pairs with the reward model at {judge.path or ctx.artifact('rm')}"
    )
    chosen = judge.raw(prompts, [p.chosen for p in pairs]).double().numpy()  # [N]
    rejected = judge.raw(prompts, [p.rejected for p in pairs]).double().numpy()  # [N]
    margin = chosen - rejected
    confidence, correct = stats.pairwise_confidence(margin)
    groups = stats.group_ids(prompts)
    boot = dict(n_resamples=cfg.bootstrap.n_resamples, seed=cfg.bootstrap.seed)
    values = {"accuracy": correct, "margin": margin, "confidence": confidence}
    task, tau = ctx.task, ctx.label_temperature()
    if task is not None:
        gold_chosen = _numpy(task.gold_reward(prompts, [p.chosen for p in pairs]))
        gold_rejected = _numpy(task.gold_reward(prompts, [p.rejected for p in pairs]))
        gold_margin = gold_chosen - gold_rejected
        values["gold_agreement"] = _agreement(margin, gold_margin)
        values["label_gold_agreement"] = _agreement(np.ones_like(margin), gold_margin)
        if tau is not None:
            values["bayes_accuracy"] = 1.0 / (1.0 + np.exp(-np.abs(gold_margin) / tau))
    n_bins = cfg.calibration_bins
    return {
        "mode": "rm",
        "checkpoints": {"reward_model": str(judge.path or ctx.artifact("rm"))},
        "n_pairs": len(pairs),
        "n_distinct_prompts": int(groups.max()) + 1 if len(groups) else 0,
        "metrics": {k: stats.bootstrap(v, groups, **boot).as_dict() for k, v in values.items()},
        "ece": {
            **stats.bootstrap_ece(confidence, correct, groups, n_bins, **boot).as_dict(),
        },
        "reliability": stats.reliability_bins(confidence, correct, n_bins),
        "per_sample": {
            "prompts": prompts,
            "chosen": chosen.tolist(),
            "rejected": rejected.tolist(),
        },
    }


def _agreement(margin: np.ndarray, gold_margin: np.ndarray) -> np.ndarray:
    """1 when the judge prefers the higher-gold response, ½ when either side is a tie, else 0."""
    same = np.sign(margin) * np.sign(gold_margin)
    return np.where(same == 0, 0.5, (same > 0).astype(np.float64))


def _numpy(x) -> np.ndarray:
    return np.asarray(x.double().numpy() if hasattr(x, "double") else x, dtype=np.float64)
