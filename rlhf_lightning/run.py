"""`run(cfg)`: the testable body of `train.py` — validate, then run the configured stages in order.

`config.validate` runs before torch, transformers or Lightning are imported, so an impossible value
fails in about a second; then each stage runs through a `context.RunContext` (what the stages
share) and `stages.STAGE_RUNNERS`. Every stage is its own wandb run, grouped under the pipeline or
sweep name.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from rlhf_lightning.config import validate

if TYPE_CHECKING:
    from rlhf_lightning.context import RunContext


def quiet_third_party() -> None:
    """Silence known third-party noise where it comes from; our own warnings stay visible."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning.pytorch", "lightning.fabric"):  # they print themselves: no duplicates
        logging.getLogger(name).propagate = False
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # see rlhf_lightning/__init__.py
    # torch 2.13 deprecates `LeafSpec`, which Lightning 2.6 still builds in its `_tree_flatten`
    # (once per fit): nothing we call, nothing a user can change.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
    # Intended here, so not worth a warning on every run: the policy stage keeps dropout off (eval
    # mode), and its checkpoints hold the state after the rollout's updates.
    warnings.filterwarnings(
        "ignore", message=r".*module\(s\) in eval mode at the start of training"
    )
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization")


def run(cfg: DictConfig) -> float | None:
    """Run `cfg.stage.stages` in order; return the metric a sweeper optimises (or None)."""
    validate(cfg)  # before the imports below: a bad value fails without paying for them
    from rlhf_lightning.context import RunContext
    from rlhf_lightning.distributed import is_rank_zero
    from rlhf_lightning.stages import STAGE_RUNNERS

    quiet_third_party()
    ctx = RunContext(cfg)
    results: dict[str, dict] = {}
    try:
        for number, stage in enumerate(cfg.stage.stages, 1):
            if is_rank_zero():
                print(_stage_line(ctx, stage, number, len(cfg.stage.stages)), flush=True)
            with ctx.stage_run(stage):
                results[stage] = STAGE_RUNNERS[stage](ctx)
    except BaseException as err:
        if is_rank_zero():
            write_result(ctx.output_dir, cfg, results, error=err)
        raise
    if is_rank_zero():  # with trainer=ddp the other ranks hold no final metrics
        write_result(ctx.output_dir, cfg, results)
        _print_summary(ctx, results)
    last = results[cfg.stage.stages[-1]]
    return last.get("objective", last.get("accuracy"))


def write_result(output_dir: Path, cfg: DictConfig, results: dict, error=None) -> None:
    """`result.json` in the run dir: status, swept values and final metrics (read by the report)."""
    record = {
        "status": "failed" if error is not None else "completed",
        "error": f"{type(error).__name__}: {error}" if error is not None else None,
        "stages": list(cfg.stage.stages),
        "overrides": _job_overrides(),
        "beta": _float_or_none(OmegaConf.select(cfg, "algo.beta")),
        "algo": OmegaConf.select(cfg, "algo.name"),
        "results": {
            k: {m: v for m, v in r.items() if isinstance(v, float | int | str | list)}
            for k, r in results.items()
        },
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "result.json").write_text(json.dumps(record, indent=2))


def _float_or_none(x):
    return float(x) if isinstance(x, int | float) else None


def _job_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


STAGE_WORK = {
    "sft": "supervised fine-tuning on demonstrations",
    "rm": "reward model (Bradley–Terry) on preference pairs",
    "policy": "RLHF from the reference against the frozen reward",
    "dpo": "direct preference optimisation on the pairs from the reference",
}


def _stage_line(ctx: RunContext, stage: str, number: int, total: int) -> str:
    """One line as a stage starts: what it does, where its model goes."""
    what = STAGE_WORK.get(stage, stage)
    if stage == "policy":
        algo, beta = OmegaConf.select(ctx.cfg, "algo.name"), OmegaConf.select(ctx.cfg, "algo.beta")
        reward = str(OmegaConf.select(ctx.cfg, "reward._target_")).rsplit(".", 1)[-1]
        what += f" ({algo}, β={beta}, {reward}, reference={ctx.cfg.policy.reference})"
    if stage == "dpo":
        dpo = ctx.cfg.dpo
        what += f" ({dpo.loss_type}, β={dpo.beta}, reference={dpo.reference})"
    return f"== [{number}/{total}] {stage}: {what} → {ctx.artifact(stage, write=True)}"


def _print_summary(ctx: RunContext, results: dict[str, dict]) -> None:
    print("\n== rlhf-lightning summary ==")
    for stage, metrics in results.items():
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"[{stage}] {shown}")
        if "artifact" in metrics:
            print(f"[{stage}] model saved to {metrics['artifact']}")
    out = ctx.output_dir.resolve()
    print(f"run directory: {out}")
    for line in files_to_open(out):
        print(line)
    if "policy" in results or "rm" in results:
        args = eval_arguments(ctx.cfg)
        if "policy" in results:
            what = "policy vs its reference, with intervals"
            mode = ""
        else:
            what, mode = "the reward model on held-out pairs: accuracy, calibration", " mode=rm"
        print(f"next: python eval.py{mode}{''.join(' ' + a for a in args)}  ({what})")


def eval_arguments(cfg: DictConfig) -> list[str]:
    """The eval.py arguments that evaluate what this run trained: its data and model choices (an
    experiment's too), paths and seed as given, and how the policy sampled."""
    from hydra.core.hydra_config import HydraConfig

    given = [
        o for o in _job_overrides() if o.startswith(("task.", "data", "paths", "seed", "model."))
    ]
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    picked = [f"{group}={choices[group]}" for group in ("task", "model") if group in choices]
    picked = [p for p in picked if p not in ("task=reviews", "model=tiny")]  # eval.py's defaults
    generation = cfg.policy.generation
    sampled = {"max_new_tokens": 32, "temperature": 1.0}  # conf/eval.yaml generation
    changed = [f"generation.{k}={generation[k]}" for k, v in sampled.items() if generation[k] != v]
    return [*picked, *given, *changed]


def files_to_open(out: Path) -> list[str]:
    """Lines naming the plots, reports and logger output in run dir `out`, and how to view them."""
    lines = []
    plots = sorted(out.glob("*.png"))
    reports = sorted(p for ext in ("md", "json", "jsonl") for p in out.glob(f"*.{ext}"))
    if plots:
        lines.append("plots: " + ", ".join(str(p) for p in plots))
    if reports:
        lines.append("reports: " + ", ".join(str(p) for p in reports))
    offline = sorted((out / "wandb").glob("offline-run-*"))
    online = sorted((out / "wandb").glob("run-*"))
    if offline:
        lines.append(
            f"wandb (offline): {out / 'wandb'} — upload: wandb sync {out / 'wandb'}/offline-run-*"
        )
    elif online:
        lines.append(f"wandb: {out / 'wandb'} (logged live)")
    for metrics in sorted(out.glob("csv/*/metrics.csv")):
        lines.append(f"csv: {metrics}")
    if (out / "tensorboard").exists():
        lines.append(f"tensorboard: tensorboard --logdir {out / 'tensorboard'}")
    return lines


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
