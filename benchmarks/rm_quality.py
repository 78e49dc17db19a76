"""Reward-model quality (issue 15): val/accuracy of `python train.py stage=rm` per factor, seeds.

Each (factor, seed) is a fresh `train.py stage=rm` process (runs in one process are not bitwise
those of fresh ones), on the built-in reviews task of that seed (`task.seed = seed`: each seed
has its own pairs and its own Bayes ceiling), one torch thread, CSV logs. A factor is a list of
overrides applied on top of `--base`; the table gives the mean ± std of val/accuracy over seeds,
the share of the way from chance to the ceiling, (acc − 0.5) / (bayes − 0.5), and the paired
difference to the first factor (same seed, same pairs: most of the seed-to-seed noise cancels).
`init_from_sft` needs `artifacts/reviews/sft` of each seed: `--sft` trains it first.

    python benchmarks/rm_quality.py [--seeds 0 1 2] [--jobs 3] [--base rm.max_epochs=2]
        [--factors default decay_all ...] [--sft] [--out /tmp/rm_quality]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FACTORS: dict[str, list[str]] = {
    "default": [],
    "decay_all": ["rm.module.no_decay=[]"],  # weight decay on norms, biases and embeddings too
    "plain_shuffle": ["rm.length_group=1"],
    "score_init_0": ["rm.score_init_std=0"],
    "lr_3e-3": ["rm.module.optimizer.lr=3e-3"],
    "lr_3e-4": ["rm.module.optimizer.lr=3e-4"],
    "constant_lr": ["rm.module.scheduler=null"],  # no warm-up, no cosine decay
    "attention_dropout_0.1": ["+model.config.attention_dropout=0.1"],
    "init_from_sft": ["rm.init_from_sft=true"],
    "hidden_128": ["model.config.hidden_size=128", "model.config.intermediate_size=512"],
    "pairs_16k": ["task.n_pairs_train=16000"],  # other data: its own root (same held-out pairs)
}
ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def train(args: list[str], root: Path, run_dir: Path) -> float:
    """Run `train.py` with `args` under `root` (data and artifacts); its wall time in seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "train.py", *args, "logger=csv", "trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        done = subprocess.run(
            [*cmd, f"hydra.run.dir={run_dir}"],
            cwd=REPO,
            env={**os.environ, **ENV, "RLHF_ROOT": str(root)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: see {run_dir / 'log.txt'}")
    return time.perf_counter() - start


def sft_run(seed: int, out: Path) -> float:
    """The SFT artifact `rm.init_from_sft` starts from, for one seed's task."""
    args = ["stage=sft", f"seed={seed}", "callbacks=none"]
    return train(args, out / f"seed{seed}", out / "runs" / f"sft_s{seed}")


def rm_run(factor: str, seed: int, base: list[str], out: Path) -> dict:
    """val/accuracy and val/bayes_accuracy of the last validation of one run."""
    run_dir = out / "runs" / f"{factor}_s{seed}"
    args = ["stage=rm", f"seed={seed}", *base, *FACTORS[factor]]
    own_data = any(o.startswith("task.") for o in FACTORS[factor])  # never rewrite shared data
    wall = train(args, out / (f"{factor}_seed{seed}" if own_data else f"seed{seed}"), run_dir)
    with open(run_dir / "csv" / "rm" / "metrics.csv") as f:
        last = [r for r in csv.DictReader(f) if r.get("val/accuracy")][-1]
    return {
        "factor": factor,
        "seed": seed,
        "accuracy": float(last["val/accuracy"]),
        "bayes_accuracy": float(last["val/bayes_accuracy"]),
        "wall_s": wall,
    }


def summarise(results: list[dict], reference: str) -> list[dict]:
    """Per factor: mean ± std over seeds, share of the way to Bayes, paired difference."""
    ref = {r["seed"]: r["accuracy"] for r in results if r["factor"] == reference}
    rows = []
    for factor in dict.fromkeys(r["factor"] for r in results):
        runs = [r for r in results if r["factor"] == factor]
        acc = [r["accuracy"] for r in runs]
        way = [(r["accuracy"] - 0.5) / (r["bayes_accuracy"] - 0.5) for r in runs]
        diff = [r["accuracy"] - ref[r["seed"]] for r in runs if r["seed"] in ref]
        rows.append(
            {
                "factor": factor,
                "seeds": len(runs),
                "mean": statistics.mean(acc),
                "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "way": statistics.mean(way),
                "paired_diff": statistics.mean(diff) if diff else float("nan"),
                "paired_std": statistics.stdev(diff) if len(diff) > 1 else 0.0,
                "wall_s": statistics.mean(r["wall_s"] for r in runs),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--factors", nargs="+", default=list(FACTORS), choices=list(FACTORS))
    parser.add_argument("--base", nargs="*", default=[], help="overrides for every run")
    parser.add_argument("--jobs", type=int, default=3, help="runs at once")
    parser.add_argument("--sft", action="store_true", help="train each seed's SFT model first")
    parser.add_argument("--out", type=Path, default=Path("/tmp/rm_quality"))
    args = parser.parse_args()
    with ThreadPoolExecutor(args.jobs) as pool:
        if args.sft or "init_from_sft" in args.factors:
            list(pool.map(lambda s: sft_run(s, args.out), args.seeds))
        jobs = [(f, s) for f in args.factors for s in args.seeds]
        results = list(pool.map(lambda j: rm_run(*j, args.base, args.out), jobs))
    rows = summarise(results, args.factors[0])
    print(f"| factor | val/accuracy (mean ± std) | way to Bayes | vs {args.factors[0]} | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['factor']} | {r['mean']:.4f} ± {r['std']:.4f} | {100 * r['way']:.1f} % | "
            f"{r['paired_diff']:+.4f} ± {r['paired_std']:.4f} | {r['wall_s']:.0f} |"
        )
    out = REPO / "benchmarks" / "results" / "rm_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"base": args.base, "runs": results, "summary": rows}, indent=2))


if __name__ == "__main__":
    main()
