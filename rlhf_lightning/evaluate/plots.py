"""The PNGs of `eval.py` (matplotlib `Figure` objects: no pyplot, no global backend state).

Policy mode: `win_rates.png` (each judge, with its 95 % interval), `reward_kl.png` (each side's
gold — or proxy — reward at its KL beside the reference's best-of-n curve), `rewards.png`
(reward histograms per side and judge). RM mode: `reliability.png` (σ(|r⁺ − r⁻|) against the
observed agreement, per bin) and `rm_rewards.png` (chosen and rejected reward histograms).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

COLOURS = {"policy": "tab:blue", "reference": "tab:grey", "compare": "tab:orange"}


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def win_rates(result: dict, path: Path) -> Path:
    items = list(result["win_rates"].items())  # "policy_vs_reference/gold" -> estimate
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(items)))
    ax = fig.subplots()
    for y, (_, e) in enumerate(items):
        ax.errorbar(
            e["mean"], y, xerr=[[e["mean"] - e["lo"]], [e["hi"] - e["mean"]]], fmt="o", capsize=4
        )
    ax.axvline(0.5, color="k", lw=0.8, ls="--")
    labels = [n.replace("_vs_", " over ").replace("/", " (") + ")" for n, _ in items]
    ax.set_yticks(range(len(items)), labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate (ties ½) with its 95 % interval over prompts")
    return _save(fig, path)


def reward_kl(result: dict, path: Path) -> Path:
    """Reward against KL: the sides' points with intervals on both axes, best-of-n's curve."""
    judge = "gold" if "gold" in result["judges"] else result["proxy"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    bon = result.get("best_of_n")
    if bon is not None:
        key = "gold" if judge == "gold" else "proxy"
        kls = [p["kl"] for p in bon["curve"]]
        ax.plot(
            kls,
            [p[key] for p in bon["curve"]],
            "s-",
            color="tab:green",
            label="best-of-n (reference)",
        )
    for role, side in result["sides"].items():
        r, kl = side[f"reward/{judge}"], side.get("kl_exact", side["kl"])
        xerr = None if kl.get("lo") is None else [[kl["mean"] - kl["lo"]], [kl["hi"] - kl["mean"]]]
        ax.errorbar(
            kl["mean"],
            r["mean"],
            xerr=xerr,
            yerr=[[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]],
            fmt="o",
            capsize=4,
            color=COLOURS.get(role),
            label=role,
        )
    ax.set_xlabel("KL(· ‖ reference), nats")
    ax.set_ylabel(f"{judge} reward")
    ax.legend()
    return _save(fig, path)


def reward_histograms(per_sample: dict, judges: list[str], path: Path) -> Path:
    fig = Figure(figsize=(4 * len(judges), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(judges)))
    for ax, judge in zip(axes, judges, strict=True):
        values = {role: np.asarray(s["scores"][judge]) for role, s in per_sample.items()}
        bins = np.histogram_bin_edges(np.concatenate(list(values.values())), bins=30)
        for role, v in values.items():
            ax.hist(v, bins=bins, alpha=0.5, color=COLOURS.get(role), label=role)
        ax.set_xlabel(f"{judge} reward")
        ax.legend()
    return _save(fig, path)


def reliability(result: dict, path: Path) -> Path:
    """Observed agreement per confidence bin against the diagonal, bin counts underneath."""
    bins = [b for b in result["reliability"] if b["count"]]
    fig = Figure(figsize=(5, 5.5))
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = result["reliability"][0]["hi"] - result["reliability"][0]["lo"]
    centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
    top.bar(centres, [b["accuracy"] for b in bins], width=width * 0.9, alpha=0.6, label="observed")
    top.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="tab:red")
    top.plot([0.5, 1], [0.5, 1], "k--", lw=0.8, label="calibrated")
    ece = result["ece"]
    top.set_title(f"ECE {ece['mean']:.3f} [{ece['lo']:.3f}, {ece['hi']:.3f}]")
    top.set_ylabel("observed agreement with the labels")
    top.set_ylim(0, 1.02)
    top.legend()
    bottom.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="tab:grey")
    bottom.set_xlabel("σ(|r⁺ − r⁻|): the RM's confidence in its preferred response")
    bottom.set_ylabel("pairs")
    return _save(fig, path)


def rm_rewards(per_sample: dict, path: Path) -> Path:
    chosen, rejected = np.asarray(per_sample["chosen"]), np.asarray(per_sample["rejected"])
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    bins = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=40)
    ax.hist(chosen, bins=bins, alpha=0.5, label="chosen r⁺", color="tab:green")
    ax.hist(rejected, bins=bins, alpha=0.5, label="rejected r⁻", color="tab:red")
    ax.set_xlabel("raw reward-model score")
    ax.legend()
    return _save(fig, path)
