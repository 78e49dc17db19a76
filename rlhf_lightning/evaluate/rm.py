"""`mode=rm`: a reward model on preference pairs — accuracy, calibration, and on built-in tasks
agreement with gold and the Bayes ceiling.

The RM's raw Bradley–Terry margin Δ = r⁺ − r⁻ is a probability statement, P(chosen ≻ rejected) =
σ(Δ); calibration compares σ(|Δ|) with how often the RM's preferred response is the labelled one
(`stats.pairwise_confidence`, ECE). On a built-in task the labels are Bradley–Terry samples under
gold at temperature τ, so no judge can beat the Bayes accuracy σ(|g⁺ − g⁻| / τ) per pair on
average, and agreement with gold (the RM prefers the higher-gold response) is what it learnt.

Word order (`order_probe`): every response is scored again with its words shuffled (the last word,
which often carries an end-of-turn marker or the final ".", stays last). An RM that reads text
as a bag of words scores both alike: `order_preference` — how often r(y) > r(shuffled y) — is
then ≈ 0.5 where a reader of sentences gives ≈ 1, and `order_sensitivity` = mean |r(y) −
r(shuffled y)| / std r(y) is small. Such an RM is blind to repeated or swapped words and is the
first thing a policy exploits (piling up praise in any order); on a built-in task gold's own
preference for the original is reported beside it.

Closing EOS (`eos_probe`): every pair is scored again without the EOS that closes each response
(the RM stage appends it, as TRL's RewardTrainer does, and the score head reads there). An online
trainer that hands the RM `prompt + completion` decoded with `skip_special_tokens` (TRL's GRPO and
RLOO trainers: a chat model's `<|im_end|>` is special) scores with this input: `accuracy_without_eos`
is the RM's accuracy as such a trainer reads it, `eos_sensitivity` = mean |r(y) − r(y without
EOS)| / std r(y). Our policy stage appends the EOS to every response that ended.
"""

from __future__ import annotations

import random

import numpy as np

from rlhf_lightning.evaluate import stats
from rlhf_lightning.evaluate.context import EvalContext


def evaluate_reward_model(ctx: EvalContext) -> dict:
    """Everything `mode=rm` reports (JSON-ready)."""
    cfg = ctx.cfg
    judge = ctx.reward_model()
    pairs = ctx.pairs(judge.tokenizer)  # rendered with the RM's own chat template
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
            values["expected_accuracy"] = expected_accuracy(margin, gold_margin, tau)
    if cfg.order_probe:
        values.update(word_order_probe(judge, task, pairs, (chosen, rejected), cfg.seed))
    if cfg.get("eos_probe", True):
        values.update(eos_probe(judge, pairs, (chosen, rejected)))
    metrics = {k: stats.bootstrap(v, groups, **boot).as_dict() for k, v in values.items()}
    if task is not None and hasattr(task, "well_formed"):
        metrics.update(_by_form(task, pairs, values, groups, boot))
    if task is not None and hasattr(task, "gold_terms"):
        metrics.update(by_deciding_term(task, pairs, values, groups, boot))
    n_bins = cfg.calibration_bins
    return {
        "mode": "rm",
        "checkpoints": {"reward_model": str(judge.path or ctx.artifact("rm"))},
        "n_pairs": len(pairs),
        "n_distinct_prompts": int(groups.max()) + 1 if len(groups) else 0,
        "metrics": metrics,
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


def _by_form(task, pairs, values: dict, groups, boot: dict) -> dict:
    """Accuracy, gold agreement and the Bayes ceiling apart on the pairs whose two responses the
    task calls well formed and on those with a malformed one (`task.well_formed`): where the RM
    falls short of the ceiling, and whether it is the malformed text it misreads."""
    both = np.array(task.well_formed([p.chosen for p in pairs])) & np.array(
        task.well_formed([p.rejected for p in pairs])
    )
    return _on_subsets(values, groups, boot, {"well_formed": both, "malformed": ~both})


def _on_subsets(values: dict, groups, boot: dict, subsets: dict[str, np.ndarray]) -> dict:
    """Accuracy, gold agreement and the Bayes ceiling on each named subset of the pairs (a [N]
    bool mask): `<key>/<name>` with the subset's size `n`; an empty subset is left out."""
    out = {}
    for name, rows in subsets.items():
        for key in ("accuracy", "gold_agreement", "bayes_accuracy"):
            if key in values and rows.any():
                found = stats.bootstrap(values[key][rows], groups[rows], **boot).as_dict()
                out[f"{key}/{name}"] = {**found, "n": int(rows.sum())}
    return out


def by_deciding_term(task, pairs, values: dict, groups, boot: dict) -> dict:
    """Accuracy, gold agreement and the Bayes ceiling on the pairs each term of gold decides —
    the term whose contribution (`task.gold_terms`) differs most between the pair's two
    responses; pairs where no term differs count under none. Where an RM falls short of the
    ceiling then shows by what it misreads: on `task=chat`, a sentence end (one token before
    the EOS) or VADER's sentiment (a lexicon sum over the whole response)."""
    prompts = [p.prompt for p in pairs]
    chosen = task.gold_terms(prompts, [p.chosen for p in pairs])
    rejected = task.gold_terms(prompts, [p.rejected for p in pairs])
    names = list(chosen)
    if not names:
        return {}
    gap = np.abs(np.array([np.subtract(chosen[n], rejected[n]) for n in names]))  # [K, N]
    deciding, decided = gap.argmax(0), gap.max(0) > 0
    subsets = {f"decided_by_{name}": decided & (deciding == k) for k, name in enumerate(names)}
    return _on_subsets(values, groups, boot, subsets)


def word_order_probe(judge, task, pairs, scores: tuple, seed: int) -> dict[str, np.ndarray]:
    """Per pair [N]: the share of its responses scored above their word-shuffled copies, and
    mean |r(y) − r(shuffled y)| / std r(y); with a task, gold's share too. Responses of fewer
    than three words (nothing to shuffle) count one half and 0."""
    prompts = [p.prompt for p in pairs]
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]  # [2N]
    shuffled = [shuffle_words(t, random.Random(f"{seed}/order/{i}")) for i, t in enumerate(texts)]
    usable = np.array([s != t for s, t in zip(shuffled, texts)])  # [2N]
    original = np.concatenate(scores)  # [2N]
    again = judge.raw(prompts * 2, shuffled).double().numpy()  # [2N]
    scale = original.std() or 1.0
    out = {
        "order_preference": np.where(
            usable, _agreement(original - again, np.ones_like(again)), 0.5
        ),
        "order_sensitivity": np.where(usable, np.abs(original - again) / scale, 0.0),
    }
    if task is not None:
        gold = _numpy(task.gold_reward(prompts * 2, texts)) - _numpy(
            task.gold_reward(prompts * 2, shuffled)
        )
        out["gold_order_preference"] = np.where(usable, _agreement(gold, np.ones_like(gold)), 0.5)
    n = len(pairs)
    return {k: (v[:n] + v[n:]) / 2 for k, v in out.items()}  # per pair: its two responses


def eos_probe(judge, pairs, scores: tuple) -> dict[str, np.ndarray]:
    """Per pair [N]: whether the RM still prefers the chosen response when neither response has
    its closing EOS, and mean |r(y) − r(y without EOS)| / std r(y) over its two responses."""
    prompts = [p.prompt for p in pairs]
    cut = [False] * len(pairs)  # `ended` False: the ids without the closing EOS
    chosen = judge.raw(prompts, [p.chosen for p in pairs], cut).double().numpy()
    rejected = judge.raw(prompts, [p.rejected for p in pairs], cut).double().numpy()
    original = np.concatenate(scores)
    scale = original.std() or 1.0
    change = np.abs(original - np.concatenate([chosen, rejected])) / scale
    n = len(pairs)
    return {
        "accuracy_without_eos": stats.pairwise_confidence(chosen - rejected)[1],
        "eos_sensitivity": (change[:n] + change[n:]) / 2,
    }


def shuffle_words(text: str, rng: random.Random) -> str:
    """`text` with its whitespace-separated words but the last shuffled (leading space kept);
    the text itself when that leaves it unchanged."""
    words = text.split()
    if len(words) < 3:
        return text
    head = words[:-1]
    rng.shuffle(head)
    lead = text[: len(text) - len(text.lstrip())]
    return lead + " ".join([*head, words[-1]])


def expected_accuracy(margin: np.ndarray, gold_margin: np.ndarray, tau: float) -> np.ndarray:
    """Per pair, the judge's accuracy averaged over the labels' own draw (Bradley–Terry under
    gold at temperature τ): σ(|Δg|/τ) where it orders the pair as gold does, 1 − σ(|Δg|/τ) where
    it does not, ½ on a tie. Its mean is the accuracy the sampled labels estimate, without their
    sampling noise, and on the same footing as the Bayes ceiling (gold's own expected accuracy):
    the share of the way from 0.5 to the ceiling is best read from these two."""
    ceiling = 1.0 / (1.0 + np.exp(-np.abs(gold_margin) / tau))
    agree = _agreement(margin, gold_margin)
    return agree * ceiling + (1.0 - agree) * (1.0 - ceiling)


def _agreement(margin: np.ndarray, gold_margin: np.ndarray) -> np.ndarray:
    """1 when the judge prefers the higher-gold response, ½ when either side is a tie, else 0."""
    same = np.sign(margin) * np.sign(gold_margin)
    return np.where(same == 0, 0.5, (same > 0).astype(np.float64))


def _numpy(x) -> np.ndarray:
    return np.asarray(x.double().numpy() if hasattr(x, "double") else x, dtype=np.float64)
