"""Write what an evaluation found: `eval.json`, `eval.md`, `samples.jsonl`, PNGs; print the tables;
log the same numbers to the configured logger.

Scalars are logged as `eval/<side>/<metric>` (policy mode; e.g. `eval/policy/reward/gold`),
`eval/win_rate/<a>_vs_<b>/<judge>`, `eval/paired/<metric>` and `eval/rm/<metric>` (rm mode), each
with `_lo` / `_hi` for its 95 % interval. wandb also gets the samples table and the plots.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_lightning.evaluate import plots

ROWS = [  # (key in a side's metrics, what the table calls it)
    ("kl", "KL k1 (nats)"),
    ("kl_k3", "KL k3 (nats)"),
    ("reward/gold_exact", "reward (gold), exact"),
    ("kl_exact", "KL exact (nats)"),
    ("response_length", "response length (tokens)"),
    ("eos_rate", "EOS rate"),
    ("degenerate", "degenerate share"),
    ("repeated_ngram", "  repeated n-gram"),
    ("no_end", "  no EOS"),
]
RM_ROWS = [
    ("accuracy", "preference accuracy"),
    ("gold_agreement", "agreement with gold"),
    ("label_gold_agreement", "labels' agreement with gold"),
    ("bayes_accuracy", "Bayes ceiling σ(∣g⁺−g⁻∣/τ)"),
    ("expected_accuracy", "expected accuracy over the labels' draw (vs the ceiling)"),
    ("margin", "mean margin r⁺ − r⁻"),
    ("confidence", "mean confidence σ(∣r⁺ − r⁻∣)"),
    ("accuracy/well_formed", "accuracy, pairs of well-formed responses"),
    ("bayes_accuracy/well_formed", "  Bayes ceiling on them"),
    ("accuracy/malformed", "accuracy, pairs with a malformed response"),
    ("bayes_accuracy/malformed", "  Bayes ceiling on them"),
    ("order_preference", "prefers a response to its word-shuffled copy"),
    ("gold_order_preference", "  gold, the same"),
    ("order_sensitivity", "order sensitivity: mean shift of r when shuffled, / std r"),
    ("accuracy_without_eos", "accuracy, each response without its closing EOS"),
    ("eos_sensitivity", "EOS sensitivity: mean shift of r without the EOS, / std r"),
]


def fmt(e: dict | None) -> str:
    if e is None:
        return "—"
    if e.get("lo") is None:
        return f"{e['mean']:.3f} (exact)"
    return f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def write_report(result: dict, output_dir: Path) -> dict[str, Path]:
    """Every file of the evaluation into `output_dir`; returns name -> path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    per_sample = result.pop("per_sample")
    files = {"eval.json": output_dir / "eval.json", "eval.md": output_dir / "eval.md"}
    files["samples.jsonl"] = _write_samples(per_sample, result["mode"], output_dir)
    if result["mode"] == "policy":
        files["win_rates.png"] = plots.win_rates(result, output_dir / "win_rates.png")
        files["reward_kl.png"] = plots.reward_kl(result, output_dir / "reward_kl.png")
        files["rewards.png"] = plots.reward_histograms(
            per_sample, result["judges"], output_dir / "rewards.png"
        )
    else:
        files["reliability.png"] = plots.reliability(result, output_dir / "reliability.png")
        files["rm_rewards.png"] = plots.rm_rewards(per_sample, output_dir / "rm_rewards.png")
    files["eval.json"].write_text(json.dumps(result, indent=2))
    files["eval.md"].write_text(markdown(result))
    return files


def _write_samples(per_sample: dict, mode: str, output_dir: Path) -> Path:
    path = output_dir / "samples.jsonl"
    with path.open("w", encoding="utf-8") as f:
        if mode == "rm":
            for row in zip(*per_sample.values(), strict=True):
                f.write(json.dumps(dict(zip(per_sample, row, strict=True))) + "\n")
            return path
        roles = list(per_sample)
        for i, prompt in enumerate(per_sample[roles[0]]["prompts"]):
            row = {"prompt": prompt}
            for role in roles:
                side = per_sample[role]
                row[role] = side["responses"][i]
                row.update({f"{role}/{j}": s[i] for j, s in side["scores"].items()})
                row.update({f"{role}/{k}": side[k][i] for k in ("kl", "length", "ended")})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def markdown(result: dict) -> str:
    return _policy_markdown(result) if result["mode"] == "policy" else _rm_markdown(result)


def summary_markdown(result: dict) -> str:
    """What `eval.py` prints: the report without its samples table."""
    return markdown({**result, "samples": []})


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _policy_markdown(r: dict) -> str:
    roles = list(r["sides"])
    lines = [
        "# Evaluation: policy against its reference",
        "",
        *[f"- {role}: `{path}`" for role, path in r["checkpoints"].items()],
        f"- {r['n_prompts']} prompts ({r['n_distinct_prompts']} distinct) × "
        f"{r['samples_per_prompt']} samples per side, same sampling keys on every side",
        f"- judges: {', '.join(r['judges'])} (proxy: {r['proxy']}); mean [95 % bootstrap interval "
        "over prompts]",
        "",
        "## Per side",
        "",
    ]
    rows = [
        [f"reward ({j})", *(fmt(r["sides"][s].get(f"reward/{j}")) for s in roles)]
        for j in r["judges"]
    ]
    rows += [
        [label, *(fmt(r["sides"][s].get(key)) for s in roles)]
        for key, label in ROWS
        if key in r["sides"]["policy"]
    ]
    lines += _table(["metric", *roles], rows)
    lines += ["", "## Win rates (per prompt, ties count half; 0.5 = no difference)", ""]
    pairs = list(dict.fromkeys(name.split("/")[0] for name in r["win_rates"]))
    rows = [
        [p.replace("_vs_", " over "), *(fmt(r["win_rates"].get(f"{p}/{j}")) for j in r["judges"])]
        for p in pairs
    ]
    lines += _table(["", *r["judges"]], rows)
    if "paired" in r:
        lines += ["", "## policy − compare (paired: same prompts and keys)", ""]
        rows = [
            [name, fmt(e), "yes" if e["beyond_noise"] else "no (within noise)"]
            for name, e in r["paired"].items()
        ]
        lines += _table(["metric", "difference", "more than noise?"], rows)
    lines += _best_of_n_markdown(r)
    if r.get("samples"):
        lines += ["", "## Samples (the same key on every side)", ""]
        head = ["prompt", *roles]
        rows = [
            [s["prompt"], *(f"{s[x]} ({_scores(s, x, r['judges'])})" for x in roles)]
            for s in r["samples"]
        ]
        lines += _table(head, [[c.replace("|", "\\|") for c in row] for row in rows])
    return "\n".join(lines) + "\n"


def _scores(sample: dict, role: str, judges: list[str]) -> str:
    return ", ".join(f"{j} {sample[f'{role}/{j}']:.2f}" for j in judges)


def _best_of_n_markdown(r: dict) -> list[str]:
    bon = r.get("best_of_n")
    if bon is None:
        return []
    policy_kl = r["sides"]["policy"].get("kl_exact", r["sides"]["policy"]["kl"])["mean"]
    lines = [
        "",
        f"## Best-of-n from the reference (ranked by {r['proxy']}) at the policy's KL",
        "",
        f"n = {bon['n']} of {bon['n_samples']} samples on {bon['n_prompts']} prompts: "
        f"KL_bon = log n − (n−1)/n = {bon['kl']:.3f} nats (policy: {policy_kl:.3f})"
        + (
            ""
            if bon["reaches_policy_kl"]
            else "; best-of-n.max_samples stops short of the policy's KL"
        ),
        "",
    ]
    rows = [
        [
            f"reward ({name.split('/', 1)[1]})",
            fmt(e["best_of_n"]),
            fmt(e["policy"]),
            fmt(e["policy_minus_best_of_n"]),
            "yes" if e["policy_minus_best_of_n"]["beyond_noise"] else "no",
        ]
        for name, e in bon["at_policy_kl"].items()
    ]
    header = ["metric", "best-of-n", "policy (same prompts)", "policy − best-of-n", "beyond noise?"]
    return lines + _table(header, rows)


def _rm_markdown(r: dict) -> str:
    lines = [
        "# Evaluation: reward model on preference pairs",
        "",
        f"- reward model: `{r['checkpoints']['reward_model']}`",
        f"- {r['n_pairs']} pairs ({r['n_distinct_prompts']} distinct prompts); mean [95 % "
        "bootstrap interval over prompts]",
        "",
    ]
    rows = [[label, fmt(r["metrics"][key])] for key, label in RM_ROWS if key in r["metrics"]]
    rows += _deciding_term_rows(r["metrics"])
    rows.append(["expected calibration error", fmt(r["ece"])])
    lines += _table(["metric", "value"], rows)
    lines += ["", "## Reliability (confidence bins)", ""]
    rows = [
        [
            f"{b['lo']:.2f}–{b['hi']:.2f}",
            str(b["count"]),
            f"{b['confidence']:.3f}",
            f"{b['accuracy']:.3f}",
        ]
        for b in r["reliability"]
        if b["count"]
    ]
    lines += _table(["bin", "pairs", "mean confidence", "observed agreement"], rows)
    return "\n".join(lines) + "\n"


def _deciding_term_rows(metrics: dict) -> list[list[str]]:
    """Accuracy on the pairs each gold term decides (`evaluate.rm.by_deciding_term`)."""
    rows = []
    for key, e in metrics.items():
        if key.startswith("accuracy/decided_by_"):
            term = key.removeprefix("accuracy/decided_by_")
            rows.append(
                [
                    f"accuracy, {e['n']} pair{'s' * (e['n'] != 1)} decided by gold's {term} term",
                    fmt(e),
                ]
            )
            for other, label in (
                ("gold_agreement", "agreement with gold"),
                ("bayes_accuracy", "Bayes ceiling"),
            ):
                if f"{other}/decided_by_{term}" in metrics:
                    rows.append([f"  {label} on them", fmt(metrics[f"{other}/decided_by_{term}"])])
    return rows


def scalars(result: dict) -> dict[str, float]:
    """The flat `eval/...` metrics every logger gets (mean, and `_lo` / `_hi`)."""
    flat: dict[str, dict] = {}
    if result["mode"] == "policy":
        for role, side in result["sides"].items():
            flat.update({f"eval/{role}/{k}": e for k, e in side.items()})
        flat.update({f"eval/win_rate/{k}": e for k, e in result["win_rates"].items()})
        flat.update({f"eval/paired/{k}": e for k, e in result.get("paired", {}).items()})
        for k, e in (result.get("best_of_n") or {}).get("at_policy_kl", {}).items():
            flat[f"eval/best_of_n/{k}"] = e["best_of_n"]
            flat[f"eval/best_of_n/policy_minus_best_of_n/{k}"] = e["policy_minus_best_of_n"]
    else:
        flat.update({f"eval/rm/{k}": e for k, e in result["metrics"].items()})
        flat["eval/rm/ece"] = result["ece"]
    out = {}
    for key, e in flat.items():
        out[key] = float(e["mean"])
        if e.get("lo") is not None:
            out[f"{key}_lo"], out[f"{key}_hi"] = float(e["lo"]), float(e["hi"])
    return out
