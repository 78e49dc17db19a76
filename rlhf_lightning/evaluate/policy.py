"""`mode=policy`: a policy against its reference on held-out prompts, judged by every judge.

Both sides (and `compare`, a second policy) answer the same prompts with the same sampling keys
(`keyed.sample_seeds`: sample j of prompt i draws from stream (seed, EVAL_STREAM, i, j) on every
side), so differences between them carry less sampling noise, and every sample is scored by the
same judges. Per side: the mean reward under each judge, KL(side ‖ reference) by k1 and k3 on its
samples (exact on an enumerable task), response length, EOS rate and the share of degenerate
responses. Between sides: win rates per prompt (`stats.win_rates`), and with `compare` the paired
difference of every metric. Best-of-n from the reference at the policy's KL is the baseline RL
must beat (KL_bon(n) = log n − (n − 1)/n, `analysis.overoptimisation`).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from rlhf_lightning.analysis.oracle import oracle_setup
from rlhf_lightning.analysis.overoptimisation import (
    best_of_n_curve,
    best_of_n_expectation,
    best_of_n_kl,
)
from rlhf_lightning.evaluate import stats
from rlhf_lightning.evaluate.context import EvalContext, check_same_vocabulary
from rlhf_lightning.generation.keyed import EVAL_STREAM, sample_seeds
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.modules.evaluation import EvaluationSetup, sample_and_score
from rlhf_lightning.rewards.base import score

BEST_OF_N_STREAM = EVAL_STREAM + 1  # best-of-n draws: never the same keys as the sides' samples


def evaluate_policy(ctx: EvalContext) -> dict:
    """Everything `mode=policy` reports (a JSON-ready dict; `report.py` writes and logs it)."""
    cfg = ctx.cfg
    paths, tokenizer, models = _load_models(ctx)
    generation, exact = _generation(ctx, tokenizer, models["reference"])
    judges = ctx.judges()
    proxy_name = next(iter(judges))
    module = EvaluationSetup(  # what sample_and_score reads of a PolicyModule
        generation=generation,
        tokenizer=tokenizer,
        reference=models["reference"],
        reward=judges[proxy_name],
    )
    prompts, k = ctx.prompts(), cfg.samples_per_prompt
    start = time.perf_counter()
    sides = _sample_sides(ctx, module, models, prompts, judges)
    rate = len(models) * len(prompts) * k / (time.perf_counter() - start)  # samples/s, scored
    groups = stats.group_ids(sides["policy"]["prompts"])  # [R·k] cluster = prompt text
    boot = dict(n_resamples=cfg.bootstrap.n_resamples, seed=cfg.bootstrap.seed)
    need_end = generation.min_new_tokens < generation.max_new_tokens
    result = {
        "mode": "policy",
        "checkpoints": paths,
        "judges": list(judges),
        "proxy": proxy_name,
        "n_prompts": len(prompts),
        "n_distinct_prompts": int(groups.max()) + 1,
        "samples_per_prompt": k,
        "sides": {
            role: _side_metrics(side, groups, cfg.degenerate_ngram, need_end, boot)
            for role, side in sides.items()
        },
        "win_rates": _win_rates(sides, groups, k, boot),
    }
    if exact is not None:  # enumerated: no sampling noise, so no interval
        for role in sides:
            result["sides"][role].update(_exact(exact, models[role]))
    if "compare" in sides:
        result["paired"] = _paired(sides, groups, cfg.degenerate_ngram, need_end, boot)
    if cfg.best_of_n.enabled:
        kl = result["sides"]["policy"].get("kl_exact", result["sides"]["policy"]["kl"])["mean"]
        policy = sides["policy"]
        result["best_of_n"] = _best_of_n(ctx, module, policy, judges, proxy_name, kl, boot, rate)
    result["samples"] = _samples_table(sides, k, cfg.n_show)
    result["per_sample"] = {  # every sample, for samples.jsonl and the histograms
        role: {
            "prompts": side["prompts"],
            "responses": side["responses"],
            "scores": {j: s.tolist() for j, s in side["scores"].items()},
            **{key: side[key].tolist() for key in ("kl", "kl_k3", "length", "ended")},
        }
        for role, side in sides.items()
    }
    return result


def _load_models(ctx: EvalContext):
    """({role: path}, the policy's tokenizer, {role: frozen causal LM}) for every side."""
    paths = {"policy": ctx.checkpoint("policy"), "reference": ctx.checkpoint("reference")}
    if ctx.cfg.checkpoints.compare:
        paths["compare"] = ctx.checkpoint("compare")
    tokenizer = ctx.tokenizer = ctx.load_tokenizer(paths["policy"])
    for role in paths:
        if role != "policy":
            check_same_vocabulary(tokenizer, ctx.load_tokenizer(paths[role]), f"policy and {role}")
    return paths, tokenizer, {role: ctx.causal_lm(path, tokenizer) for role, path in paths.items()}


def _sample_sides(ctx: EvalContext, module, models, prompts, judges) -> dict:
    """Each side's samples (the same keys on every side), scored by every judge (numpy [R·k])."""
    cfg, k = ctx.cfg, ctx.cfg.samples_per_prompt
    seeds = sample_seeds(cfg.seed, EVAL_STREAM, range(len(prompts)), k)
    print(f"[eval] sampling {k} responses to {len(prompts)} prompts per side ({', '.join(models)})")
    proxy_name = next(iter(judges))
    sides = {}
    for role, model in models.items():
        out = sample_and_score(module, model, prompts, k, None, cfg.batch_size, seeds)
        side = _score(out, module.generation.max_new_tokens)
        side["scores"] = {proxy_name: side.pop("proxy")}  # every judge scores every response
        for name, judge in judges.items():
            if name != proxy_name:
                texts = (side["prompts"], side["responses"])
                side["scores"][name] = _numpy(score(judge, *texts, group_size=k))
        sides[role] = side
    return sides


def _generation(ctx: EvalContext, tokenizer, reference):
    """Sampling settings (`generation`), fixed-length and restricted on an enumerable task, and
    that task's exact evaluator (which standardises its gold table under the reference)."""
    generation = GenerationSettings(**dict(ctx.cfg.generation))
    return generation, oracle_setup(ctx.task, tokenizer, reference, generation)


def _score(out: dict, max_new_tokens: int) -> dict:
    """sample_and_score's output as numpy [B] arrays; `ended` from its EOS flags where it gives
    them, else from length (a response without EOS runs to max_new_tokens)."""
    side = {k: out[k] for k in ("prompts", "responses")}
    for key in ("proxy", "kl", "kl_k3", "length"):
        side[key] = _numpy(out[key])
    ended = out.get("ended")
    ended = side["length"] < max_new_tokens if ended is None else _numpy(ended)
    side["ended"] = np.asarray(ended, dtype=np.float64)
    return side


def _numpy(x) -> np.ndarray:
    return x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _side_metrics(side, groups, ngram, need_end, boot) -> dict:
    flags = stats.degenerate_flags(side["responses"], side["ended"], ngram, need_end)
    values = {f"reward/{name}": s for name, s in side["scores"].items()}
    values.update(
        kl=side["kl"],
        kl_k3=side["kl_k3"],
        response_length=side["length"],
        eos_rate=side["ended"],
        **flags,
    )
    return {name: stats.bootstrap(v, groups, **boot).as_dict() for name, v in values.items()}


def _by_prompt(scores: np.ndarray, k: int) -> np.ndarray:
    return scores.reshape(-1, k)  # [R·k] grouped by prompt row -> [R, k]


def _win_rates(sides, groups, k, boot) -> dict:
    """Win rate of each non-reference side over the reference (and policy over compare)."""
    pairs = [(role, "reference") for role in sides if role != "reference"]
    if "compare" in sides:
        pairs.append(("policy", "compare"))
    row_groups = groups[::k]  # [R] the prompt of each row of k samples
    out = {}
    for a, b in pairs:
        for judge in sides[a]["scores"]:
            w = stats.win_rates(
                _by_prompt(sides[a]["scores"][judge], k), _by_prompt(sides[b]["scores"][judge], k)
            )
            out[f"{a}_vs_{b}/{judge}"] = stats.bootstrap(w, row_groups, **boot).as_dict()
    return out


def _paired(sides, groups, ngram, need_end, boot) -> dict:
    """policy − compare per sample (same prompt, same key), with its interval: a difference whose
    interval excludes 0 is more than sampling noise."""
    out = {}
    a, b = sides["policy"], sides["compare"]
    metrics = {f"reward/{j}": (a["scores"][j], b["scores"][j]) for j in a["scores"]}
    metrics.update(kl=(a["kl"], b["kl"]), response_length=(a["length"], b["length"]))
    metrics["eos_rate"] = (a["ended"], b["ended"])
    da = stats.degenerate_flags(a["responses"], a["ended"], ngram, need_end)["degenerate"]
    db = stats.degenerate_flags(b["responses"], b["ended"], ngram, need_end)["degenerate"]
    metrics["degenerate"] = (da, db)
    for name, (x, y) in metrics.items():
        estimate = stats.bootstrap(np.asarray(x) - np.asarray(y), groups, **boot)
        out[name] = {**estimate.as_dict(), "beyond_noise": estimate.excludes(0.0)}
    return out


def _exact(exact, model) -> dict:
    """Exact KL(model ‖ reference) and expected gold reward, by enumerating the response space."""
    from rlhf_lightning.analysis.optimum import expected_reward, kl_divergence

    with torch.no_grad():
        table = exact.policy_logprobs(model).cpu()  # [P, N] log p(y|u)
    return {
        "kl_exact": {"mean": float(kl_divergence(table, exact.ref_logprobs).mean())},
        "reward/gold_exact": {"mean": float(expected_reward(table, exact.rewards).mean())},
    }


def _best_of_n(ctx, module, policy, judges, proxy_name, kl, boot, rate: float) -> dict:
    """Best-of-n from the reference, ranked by the proxy, at the n whose KL is nearest the policy's,
    against the policy on the same prompts (paired by prompt).

    N (samples per prompt) is the smallest power of two with KL_bon(N) ≥ the policy's KL, at most
    `best_of_n.max_samples`, on the first `best_of_n.n_prompts` distinct prompts. `rate`: samples/s
    of this run's sides, for the time the baseline will take (printed before it starts)."""
    cfg = ctx.cfg.best_of_n
    n_max = 2
    while best_of_n_kl(n_max) < kl and n_max < cfg.max_samples:
        n_max *= 2
    n_max = min(n_max, cfg.max_samples)
    distinct = list(dict.fromkeys(policy["prompts"]))[: cfg.n_prompts]
    seeds = sample_seeds(ctx.cfg.seed, BEST_OF_N_STREAM, range(len(distinct)), n_max)
    total = n_max * len(distinct)
    print(
        f"[eval] best-of-n baseline: {n_max} reference samples for each of {len(distinct)} prompts "
        f"({total} samples, ~{total / rate / 60:.0f} min at the sides' {rate:.1f} samples/s; "
        "best_of_n.enabled=false skips it, best_of_n.max_samples caps N)"
    )
    out = sample_and_score(
        module, module.reference, distinct, n_max, None, ctx.cfg.batch_size, seeds
    )
    proxy = out["proxy"].view(len(distinct), n_max)  # [P, N]
    scores = {
        name: torch.as_tensor(
            score(judge, out["prompts"], out["responses"], group_size=n_max)
        ).view(len(distinct), n_max)
        for name, judge in judges.items()
        if name != proxy_name
    }
    n = min(range(1, n_max + 1), key=lambda m: abs(best_of_n_kl(m) - kl))
    position = {p: i for i, p in enumerate(distinct)}
    rows = np.array([position.get(p, -1) for p in policy["prompts"]])  # [R·k] prompt of each sample
    at_kl = {}
    for name, values in {proxy_name: proxy, **scores}.items():
        bon = best_of_n_expectation(proxy, values, n).numpy()  # [P]
        mine = np.bincount(rows[rows >= 0], weights=policy["scores"][name][rows >= 0])
        mine = mine / np.bincount(rows[rows >= 0])  # [P] the policy's mean on the same prompts
        difference = stats.bootstrap(mine - bon, **boot)
        at_kl[f"reward/{name}"] = {
            "best_of_n": stats.bootstrap(bon, **boot).as_dict(),
            "policy": stats.bootstrap(mine, **boot).as_dict(),
            "policy_minus_best_of_n": {
                **difference.as_dict(),
                "beyond_noise": difference.excludes(0.0),
            },
        }
    return {
        "n": n,
        "n_samples": n_max,
        "n_prompts": len(distinct),
        "kl": best_of_n_kl(n),
        "reaches_policy_kl": best_of_n_kl(n_max) >= kl or math.isclose(best_of_n_kl(n), kl),
        "at_policy_kl": at_kl,
        "curve": best_of_n_curve(proxy, scores.get("gold")),
    }


def _samples_table(sides, k: int, n_show: int) -> list[dict]:
    """Sample 0 (one key) of the first `n_show` prompt rows, side by side, with every score."""
    rows = []
    for i in range(0, min(n_show * k, len(sides["policy"]["prompts"])), k):
        row = {"prompt": sides["policy"]["prompts"][i]}
        for role, side in sides.items():
            row[role] = side["responses"][i]
            row.update({f"{role}/{j}": float(s[i]) for j, s in side["scores"].items()})
        rows.append(row)
    return rows
