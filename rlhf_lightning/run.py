"""`run(cfg)`: the testable body of `train.py` — validate, then run the configured stages in order.

Each stage builds data → module → callbacks → loggers → trainer in that order (STYLE.md) through
a `RunContext`, which holds what stages share: the data source, the tokenizer, the model spec and
the artifact paths. Every stage is its own wandb run, grouped under the pipeline or sweep name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rlhf_lightning.callbacks.progress import progress_bar
from rlhf_lightning.config import validate
from rlhf_lightning.data.spec import DataSpec
from rlhf_lightning.distributed import is_rank_zero
from rlhf_lightning.loggers import build_logger, finish_wandb, in_multirun, sweep_names
from rlhf_lightning.models.factory import ModelSpec
from rlhf_lightning.precision import warn_if_emulated
from rlhf_lightning.resume import (
    RNGState,
    SafeCheckpointIO,
    checkpoint_dir,
    quiet_resume_warnings,
    resolve_checkpoints,
)
from rlhf_lightning.sharding import check_strategy

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class RunContext:
    """What the stages of one run share, built lazily from the composed config; the
    `rewards.base.RewardContext` a reward's `setup` reads."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.data: DataSpec = instantiate(cfg.data)
        self.model_spec: ModelSpec = instantiate(cfg.model)
        self.artifacts_dir = Path(cfg.paths.artifacts_dir) / self.data.name
        self.output_dir = Path(cfg.paths.output_dir)
        self.checkpoints = resolve_checkpoints(  # fails at start-up when ckpt_path is wrong
            cfg.get("ckpt_path"), list(cfg.stage.stages), self.output_dir, not in_multirun()
        )
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.model_spec.tokenizer(
                self.data.corpus, cache_dir=self.artifacts_dir / "tokenizer"
            )
        return self._tokenizer

    def artifact(self, stage: str, write: bool = False) -> Path:
        """Where a stage's artifact is read from or (`write=True`) written to.

        In a multirun every job writes into its own run dir (`<job>/artifacts/<stage>`), so parallel
        jobs never overwrite each other, and reads prefer what the job itself made, else the shared
        `artifacts/<task>/<stage>` (so a β sweep reuses one SFT and one RM).
        """
        local = self.output_dir / "artifacts" / stage
        if write:
            return local if sweep_names(stage)[0] is not None else self.artifacts_dir / stage
        return local if (local / "config.json").exists() else self.artifacts_dir / stage

    def ckpt_path(self, stage: str) -> str | None:
        """The checkpoint `stage` resumes from (see `rlhf_lightning.resume`), or None."""
        path = self.checkpoints.get(stage)
        if path is not None:
            print(f"[{stage}] resuming from {path}")
            quiet_resume_warnings()
        return path

    def trainer(self, stage: str, **overrides) -> L.Trainer:
        nodes = (self.cfg.get("callbacks") or {}).values()  # an experiment may size a callback
        callbacks = [instantiate(c) for c in nodes if "_target_" in c]  # that callbacks=none drops
        callbacks = [c for c in callbacks if stage in getattr(c, "stages", (stage,))]
        if self.cfg.get("checkpoint") is None:  # checkpoint=null: no Lightning checkpoint (the
            overrides["enable_checkpointing"] = False  # artifact is still saved): 1.6 GB less per
            checkpoints = []  # SmolLM2 stage, and this run leaves nothing to resume from
        else:
            dirpath = checkpoint_dir(self.output_dir, stage)  # checkpoints/<stage>/last.ckpt
            checkpoints = [instantiate(self.cfg.checkpoint, dirpath=str(dirpath))]
        if self.cfg.trainer.get("enable_progress_bar", True):
            callbacks.append(progress_bar())  # "Epoch 0 · ≤ 60 steps", not Lightning's "0/-2"
        trainer = instantiate(
            self.cfg.trainer,
            callbacks=[RNGState(), *callbacks, *checkpoints],  # RNG first: see RNGState
            logger=self._logger(stage),
            plugins=[SafeCheckpointIO()],  # checkpoints load with weights_only=True
            **overrides,
        )
        check_strategy(trainer.strategy)  # before any work: e.g. ZeRO-3 is refused
        warn_if_emulated(trainer)  # bf16 on a CPU without AVX-512 BF16/AMX: ~30x slower
        for logger in trainer.loggers:  # the whole composed config, so runs can be compared
            logger.log_hyperparams(to_dict(self.cfg))
        return trainer

    def _logger(self, stage: str):
        sweep_group, sweep_name = sweep_names(stage)
        group = sweep_group or f"{self.data.name}-{self.output_dir.name}"
        return build_logger(self.cfg.get("logger"), stage, group, sweep_name)

    @contextlib.contextmanager
    def stage_run(self, stage: str) -> Iterator[None]:
        """Seed, run a stage, and always close its wandb run so runs never share one."""
        L.seed_everything(self.cfg.seed, workers=True, verbose=False)
        try:
            yield
        finally:
            finish_wandb()


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
    validate(cfg)
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
