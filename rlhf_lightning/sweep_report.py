"""Sweep report: one table row per job and the reward–KL pictures of a Hydra multirun.

Written at the end of every multirun by `SweepReport` (a Hydra callback), or later with
`python -m rlhf_lightning.sweep_report SWEEP_DIR`. Reads each job's `result.json` (see `run.write_result`);
a job that failed, or died without one, is a row marked failed — the others are still reported.

Files in the sweep dir: report.csv, report.md, frontier.png (proxy and gold vs KL, one point per
job, with the exact optimal frontier under it on enumerable tasks) and overoptimisation.png (gold and
proxy vs sqrt KL of every job, when jobs saved their evaluation curves).

Size (over ~300 lines): collecting the jobs, the table and its two plots are one report, read
from the same rows; the plots are a third of it.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

COLUMNS = [
    "job",
    "status",
    "overrides",
    "algo",
    "beta",
    "kl",
    "proxy_reward",
    "gold_reward",
    "objective",
    "objective_star",
    "optimum_gap",
    "exact_kl",
    "exact_reward",
    "kl_to_optimum",
    "implicit_accuracy",
    "frontier_reward",
    "above_frontier",
    "closure",
    "closure_vs_exact",
    "error",
]


def collect(sweep_dir: Path) -> list[dict]:
    """One dict per job folder (a folder holding `.hydra/`), sorted by job number."""
    rows = []
    for job in sorted(
        (p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()),
        key=lambda p: (len(p.name), p.name),
    ):
        path = job / "result.json"
        if not path.exists():
            rows.append({"job": job.name, "status": "failed", "error": "no result.json (killed?)"})
            continue
        record = json.loads(path.read_text())
        for name, last in _routes(record):
            row = {
                "job": job.name if name is None else f"{job.name}/{name}",
                "status": record["status"],
                "error": record.get("error"),
                "overrides": " ".join(record.get("overrides", [])),
                "algo": last.get("algo", record.get("algo")),
                "beta": last.get("beta", record.get("beta")),
                **_metrics(last),
            }
            row["_frontier"] = last.get("frontier")
            row["_curve"] = _curve(job)
            rows.append(row)
    _add_closures(rows)
    _add_frontier(rows)
    _keep_swept_overrides(rows)
    return rows


ROUTES = ("dpo", "policy")  # stages that end in a policy: one row each when a job runs both


def _routes(record: dict) -> list[tuple[str | None, dict]]:
    """(stage name or None, its results) per row of a job: the last stage, or each route stage
    when the job ran several (`stage=dpo_vs_rlhf`: DPO and RLHF on the same pairs)."""
    results = record.get("results") or {}
    routes = [s for s in record["stages"] if s in ROUTES and s in results]
    if len(routes) > 1:
        return [(s, results[s]) for s in routes]
    return [(None, results.get(record["stages"][-1], {}))]


def _keep_swept_overrides(rows: list[dict]) -> None:
    """Show only the overrides that differ between jobs (the swept values)."""
    parts = [set((r.get("overrides") or "").split()) for r in rows]
    common = set.intersection(*parts) if parts else set()
    for row in rows:
        row["overrides"] = " ".join(
            o for o in (row.get("overrides") or "").split() if o not in common
        )


def frontier_reward_at(frontier: list[dict], kl: float) -> float:
    """Most reward any policy can have at KL `kl`: the optimal frontier, interpolated in KL.

    The frontier {(KL(p*_β‖p_ref), E_{p*_β}[r])} is increasing in KL as β falls; beyond its
    largest KL it is flat (no policy gains reward past the best response).
    """
    points = sorted((p["kl"], p["reward"]) for p in frontier)
    if kl <= points[0][0]:
        return points[0][1]
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k0 <= kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / max(k1 - k0, 1e-12)
    return points[-1][1]


def _add_frontier(rows: list[dict]) -> None:
    """Flag a job whose exact (KL, E[r]) lies above the optimal frontier: that would be a bug."""
    for row in rows:
        if row.get("_frontier") and "exact_kl" in row:
            row["frontier_reward"] = frontier_reward_at(row["_frontier"], row["exact_kl"])
            # interpolation between frontier points is a chord of a concave curve: a tolerance
            row["above_frontier"] = row["exact_reward"] > row["frontier_reward"] + 1e-3


def _metrics(last: dict) -> dict:
    keys = [
        "kl",
        "proxy_reward",
        "gold_reward",
        "objective",
        "objective_star",
        "optimum_gap",
        "exact_kl",
        "exact_reward",
        "exact_objective",
        "reference_objective",
        "kl_to_optimum",
        "implicit_accuracy",
    ]
    return {k: last[k] for k in keys if k in last}


def _curve(job: Path) -> list[dict] | None:
    path = next(iter(job.rglob("overoptimisation.json")), None)
    return json.loads(path.read_text()) if path else None


def _add_closures(rows: list[dict]) -> None:
    """closure = (J − J_ref)/(J* − J_ref); closure_vs_exact = closure / closure of algo=exact at β."""
    for row in rows:
        if {"exact_objective", "objective_star", "reference_objective"} <= row.keys():
            gap = row["objective_star"] - row["reference_objective"]
            row["closure"] = (row["exact_objective"] - row["reference_objective"]) / gap
    exact = {r["beta"]: r["closure"] for r in rows if r.get("algo") == "exact" and "closure" in r}
    for row in rows:
        if "closure" in row and exact.get(row.get("beta")):
            row["closure_vs_exact"] = row["closure"] / exact[row["beta"]]


def write_report(sweep_dir: Path) -> dict[str, Path]:
    """Write the table and plots into `sweep_dir`; return their paths."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    paths = {"csv": sweep_dir / "report.csv", "md": sweep_dir / "report.md"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text(_markdown(rows))
    paths["frontier"] = _plot_frontier(rows, sweep_dir / "frontier.png")
    if any(r.get("_curve") for r in rows):
        paths["overoptimisation"] = _plot_curves(rows, sweep_dir / "overoptimisation.png")
    print(
        f"[report] {len(rows)} jobs ({sum(r['status'] != 'completed' for r in rows)} failed) "
        f"→ {paths['md']}"
    )
    return paths


def best_gold(rows: list[dict]) -> dict | None:
    done = [r for r in rows if r["status"] == "completed" and r.get("gold_reward") is not None]
    return max(done, key=lambda r: r["gold_reward"]) if done else None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown(rows: list[dict]) -> str:
    shown = [c for c in COLUMNS if any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in shown) + " |" for r in rows]
    best = best_gold(rows)
    if best is not None:
        lines += [
            "",
            f"Best gold reward: β = {_fmt(best.get('beta'))} (job {best['job']}, "
            f"gold {best['gold_reward']:.4g}, KL {best.get('kl', float('nan')):.4g}).",
        ]
    failed = [r["job"] for r in rows if r["status"] != "completed"]
    if failed:
        lines += ["", f"Failed jobs: {', '.join(failed)} (see their run dirs)."]
    return "\n".join(lines) + "\n"


def _plot_frontier(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((r for r in rows if r["status"] == "completed"), key=lambda r: r.get("beta") or 0)
    fig, ax = plt.subplots(figsize=(6, 4))
    exact = [r for r in done if "exact_kl" in r]
    if exact:  # enumerable task: exact (KL, E[r]) of each job, under the optimal frontier
        frontier = next((r["_frontier"] for r in done if r.get("_frontier")), None)
        if frontier:
            ax.plot(
                [p["kl"] for p in frontier],
                [p["reward"] for p in frontier],
                "k-",
                label="optimal frontier (p*_β)",
            )
        for algo in dict.fromkeys(r.get("algo") for r in exact):  # one marker per route
            mine = [r for r in exact if r.get("algo") == algo]
            ax.plot(
                [r["exact_kl"] for r in mine],
                [r["exact_reward"] for r in mine],
                "o",
                label=f"{algo or 'jobs'} (exact)",
            )
    else:
        ax.plot(
            [r.get("kl") for r in done],
            [r.get("proxy_reward") for r in done],
            "o-",
            label="proxy reward",
        )
        if any(r.get("gold_reward") is not None for r in done):
            ax.plot(
                [r.get("kl") for r in done],
                [r.get("gold_reward") for r in done],
                "s-",
                label="gold reward",
            )
    for r in done:
        x = r.get("exact_kl", r.get("kl"))
        y = r.get("exact_reward", r.get("proxy_reward"))
        if x is not None and y is not None and r.get("beta") is not None:
            ax.annotate(f"β={r['beta']:g}", (x, y), fontsize=7)
    ax.set_xlabel("KL(p_θ ‖ p_ref) [nats]")
    ax.set_ylabel("reward")
    ax.set_title("reward–KL frontier of the sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_curves(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(rows):
        curve = r.get("_curve") or {}
        points = curve.get("points", [])
        if not points:
            continue
        # a trajectory in step order, each measured point marked: KL can fall back between
        # evaluations, and the line then runs leftwards (the last point is the filled one)
        d = [math.sqrt(max(p["kl"], 0.0)) for p in points]
        label, colour = f"β={r.get('beta')}", f"C{i % 10}"
        series = [("proxy", "--", "o")]
        if all(p.get("gold") is not None for p in points):
            series.append(("gold", "-", "s"))
        for key, style, marker in series:
            y = [p[key] for p in points]
            ax.plot(
                d,
                y,
                style,
                color=colour,
                marker=marker,
                markersize=3,
                mfc="none",
                label=f"{key} {label}",
            )
            ax.plot(d[-1:], y[-1:], marker, color=colour, markersize=5)
    bon = next(
        (
            (r.get("_curve") or {}).get("best_of_n")
            for r in rows
            if (r.get("_curve") or {}).get("best_of_n")
        ),
        None,
    )
    if bon:
        ax.plot(
            [math.sqrt(p["kl"]) for p in bon],
            [p["gold"] for p in bon],
            "k:",
            label="best-of-n gold",
        )
    ax.set_xlabel("sqrt KL(p_θ ‖ p_ref)")
    ax.set_ylabel("reward")
    ax.set_title("over-optimisation: proxy vs gold")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class SweepReport(Callback):
    """Hydra callback: write the report when a multirun ends (even if some jobs failed)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        rows = collect(Path(config.hydra.sweep.dir))
        write_report(Path(config.hydra.sweep.dir))
        failed = [r["job"] for r in rows if r["status"] != "completed"]
        if failed:  # the report is written; the exit status still says the sweep was not clean
            raise SystemExit(f"{len(failed)} of {len(rows)} sweep jobs failed: {', '.join(failed)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m rlhf_lightning.sweep_report SWEEP_DIR", file=sys.stderr)
        return 2
    write_report(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
