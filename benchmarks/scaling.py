"""How our policy step time scales with batch size (prompts per step) and response length.

Two sweeps of `PolicyModule` (algo=rloo, k samples per prompt) on the tiny models of
`policy_throughput.py`: prompts_per_step P ∈ {4, 8, 16, 32} at T = 32 new tokens, and
max_new_tokens T ∈ {8, 16, 32, 64} at P = 16. Each point reports the median step time over runs,
completions/s, generated tokens/s and the share of the step spent generating and updating. A step
time that barely grows with P means per-call overhead (Python, kernel launches), not arithmetic,
bounds the step; one that grows linearly with T means the token-by-token decode loop does.

    python benchmarks/scaling.py [--quick] [--runs N] [--batch-sizes P ...] [--lengths T ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import common
import policy_throughput as policy

SCRIPT = Path(__file__).resolve()
WORKERS = {"ours": policy.run_ours, "prepare": common.prepare_worker}


def sweep_points(args) -> list[tuple[str, int, int]]:
    """(sweep, P, T) points of both sweeps (the shared centre point appears in each)."""
    points = [("batch", p, args.tokens) for p in args.batch_sizes]
    points += [("length", args.prompts, t) for t in args.lengths]
    return points


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    policy.add_policy_options(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64])
    p.set_defaults(steps=6)
    args = p.parse_args()
    if args.worker:
        return common.worker_main(args, WORKERS)
    if args.quick:
        args.in_process, args.runs, args.k, args.steps, args.warmup = True, 1, 2, 3, 1
        args.batch_sizes, args.lengths, args.prompts, args.tokens = [2, 4], [4, 8], 2, 4
    policy.size_defaults(args)
    settings = common.task_settings(64, 16, args.seed)
    ws = common.workspace_for(args, settings)
    points = sweep_points(args)
    unique = list(dict.fromkeys((prompts, tokens) for _, prompts, tokens in points))
    print(
        f"scaling (ours): k={args.k}, {args.steps} steps ({args.warmup} warm-up), "
        f"{args.runs} run(s) per point, {args.threads} thread(s)"
    )
    results: dict[tuple[int, int], list[dict]] = {u: [] for u in unique}
    for run in range(args.runs):  # points interleaved within each run: drift hits all alike
        for prompts, tokens in unique:  # the centre point is measured once for both sweeps
            spec = policy.policy_spec(args, ws, settings, prompts=prompts, tokens=tokens)
            result = common.measure(SCRIPT, args, ["ours"], spec, WORKERS, 1)["ours"][0]
            print(f"    (P={prompts}, T={tokens}, run {run + 1})")
            results[(prompts, tokens)].append(result)
    report(args, points, results)


def summarise(args, point: tuple[str, int, int], runs: list[dict]) -> dict:
    sweep, prompts, tokens = point
    phases = policy.median_phases(runs)
    step = common.median(runs, "step_s")
    length = common.median(runs, "response_length") or tokens
    completions = prompts * args.k
    return {
        "sweep": sweep,
        "prompts": prompts,
        "tokens": tokens,
        "completions_per_step": completions,
        "step_s": step,
        "completions_per_s": completions / step,
        "generated_tokens_per_s": completions * length / step,
        "response_length": length,
        "ms_per_completion": 1e3 * step / completions,
        "generate_share": phases.get("generate", 0.0) / phases["step"] if phases else None,
        "update_share": phases.get("update", 0.0) / phases["step"] if phases else None,
        "phases": phases,
        "peak_rss_mb": common.median(runs, "peak_rss_mb"),
    }


def report(args, points, results: dict[tuple[int, int], list[dict]]) -> None:
    rows = [summarise(args, point, results[point[1:]]) for point in points]
    header = [
        "sweep",
        "P",
        "T",
        "compl/step",
        "s/step",
        "compl/s",
        "gen tok/s",
        "ms/compl",
        "gen share",
        "update share",
        "peak RSS MiB",
    ]
    keys = [
        "sweep",
        "prompts",
        "tokens",
        "completions_per_step",
        "step_s",
        "completions_per_s",
        "generated_tokens_per_s",
        "ms_per_completion",
        "generate_share",
        "update_share",
        "peak_rss_mb",
    ]
    common.print_table(
        f"our policy step vs batch size and response length (k={args.k}, medians)",
        header,
        [[row[k] for k in keys] for row in rows],
    )
    common.write_json(
        args,
        "scaling",
        {
            "environment": common.environment(args),
            "k": args.k,
            "steps": args.steps,
            "warmup": args.warmup,
            "points": rows,
            "runs": {f"P={p},T={t}": r for (p, t), r in results.items()},
        },
    )


if __name__ == "__main__":
    sys.exit(main())
