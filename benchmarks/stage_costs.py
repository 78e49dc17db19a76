"""What each stage costs on a real checkpoint: seconds per training step and peak memory, per
precision — the table in README "Bringing your own checkpoint".

Each (stage, precision) is its own `python train.py` process (so its peak RSS is its own), with
`callbacks=step_time logger=csv trainer.log_every_n_steps=1`; the step times are read back from the
CSV log (`time/step_seconds`, the first step left out as warm-up: one-time probes, allocator growth)
and the peak from `memory/peak_rss_mib`. `rm` runs first in each precision: `policy` scores with
the reward model it saved.

    python benchmarks/stage_costs.py [--stages rm policy dpo] [--precisions 32-true bf16-mixed]
        [--steps 4] [--threads 2] [-- extra train.py overrides]

Defaults: model=smollm2 on task=chat (its pairs are sampled and cached on first use), RM and DPO
batches of 16 pairs, the policy 8 prompts × 4 samples × 48 tokens (rloo), from the checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "model=smollm2",
    "task=chat",
    "logger=csv",
    "callbacks=step_time",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]
STAGE_ARGS = {
    "rm": ["stage=rm", "rm.batch_size=16", "rm.max_epochs=1", "rm.module.optimizer.lr=2e-5"],
    "policy": [
        "stage=policy",
        "policy.reference=checkpoint",
        "policy.prompts_per_step=8",
        "algo.group_size=4",
        "policy.generation.max_new_tokens=48",
        "policy.optimizer.lr=1e-6",
        "policy.eval_samples=8",
    ],
    "dpo": [
        "stage=dpo",
        "dpo.reference=checkpoint",
        "dpo.batch_size=16",
        "dpo.max_epochs=1",
        "dpo.module.optimizer.lr=1e-6",
        "dpo.eval_samples=8",
    ],
}


def steps_args(stage: str, steps: int) -> list[str]:
    if stage == "policy":
        return [f"policy.steps={steps}"]
    return [f"+trainer.limit_train_batches={steps}", "+trainer.limit_val_batches=1"]


def run(stage: str, precision: str, args, root: Path) -> dict:
    command = [
        sys.executable,
        "train.py",
        *COMMON,
        *STAGE_ARGS[stage],
        *steps_args(stage, args.steps),
        f"trainer.precision={precision}",
        f"paths.root_dir={root}",
        f"paths.data_dir={args.data_dir}",
        *args.extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{stage} {precision} failed:\n{result.stderr[-3000:]}")
    log = max((root / "outputs" / stage).glob(f"*/csv/{stage}/metrics.csv"), key=os.path.getmtime)
    with open(log) as f:
        rows = list(csv.DictReader(f))
    seconds = [float(r["time/step_seconds"]) for r in rows if r.get("time/step_seconds")]
    peak = max(float(r["memory/peak_rss_mib"]) for r in rows if r.get("memory/peak_rss_mib"))
    fallback = "[shared-prefix]" in result.stdout + result.stderr
    timed = seconds[1:] or seconds
    return {
        "stage": stage,
        "precision": precision,
        "steps": len(seconds),
        "step_seconds_median": statistics.median(timed),
        "step_seconds": seconds,
        "peak_rss_mib": peak,
        "process_seconds": wall,
        "load_average_at_start": load,
        "shared_prefix_fallback": fallback,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", default=["rm", "policy", "dpo"], choices=STAGE_ARGS)
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    p.add_argument("--steps", type=int, default=4, help="training steps per run (first: warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS)")
    p.add_argument("--data-dir", default=str(REPO / "data"), help="where task=chat caches pairs")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/stage_costs.smollm2.json")
    p.add_argument("extra", nargs="*", help="more train.py overrides (after --)")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            root = Path(tmp) / precision
            for stage in args.stages:
                row = run(stage, precision, args, root)
                results.append(row)
                print(
                    f"{stage:7s} {precision:11s} {row['step_seconds_median']:7.2f} s/step  "
                    f"peak {row['peak_rss_mib']:7.0f} MiB  (load {row['load_average_at_start']:.1f}"
                    f"{', FALLBACK' if row['shared_prefix_fallback'] else ''})",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"time": time.strftime("%FT%T"), "results": results}, indent=2))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
