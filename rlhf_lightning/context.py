"""`RunContext`: what the stages of one `train.py` run share, and how each stage's Trainer is built.

Each stage builds data → module → callbacks → loggers → trainer in that order (STYLE.md) through
a `RunContext`, which holds what stages share: the data source, the tokenizer, the model spec and
the artifact paths. Every stage is its own wandb run, grouped under the pipeline or sweep name.
This module imports Lightning, torch and transformers; `rlhf_lightning.run` imports it only once
the config has passed `config.validate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from rlhf_lightning.callbacks.progress import progress_bar
from rlhf_lightning.data.spec import DataSpec
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
from rlhf_lightning.run import to_dict
from rlhf_lightning.sharding import check_strategy


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

    def trainer(self, stage: str, keep: L.Callback | None = None, **overrides) -> L.Trainer:
        """The stage's Trainer: the config's callbacks, checkpoints and logger; `keep`: a stage's
        own ModelCheckpoint (the best validated weights, `stages.common.best_weights`)."""
        nodes = (self.cfg.get("callbacks") or {}).values()  # an experiment may size a callback
        callbacks = [instantiate(c) for c in nodes if "_target_" in c]  # that callbacks=none drops
        callbacks = [c for c in callbacks if stage in getattr(c, "stages", (stage,))]
        if self.cfg.get("checkpoint") is None:  # checkpoint=null: no Lightning checkpoint (the
            checkpoints = []  # artifact is still saved): 1.6 GB less per SmolLM2 stage, and this
            if keep is None:  # run leaves nothing to resume from
                overrides["enable_checkpointing"] = False
        else:
            dirpath = checkpoint_dir(self.output_dir, stage)  # checkpoints/<stage>/last.ckpt
            checkpoints = [instantiate(self.cfg.checkpoint, dirpath=str(dirpath))]
        if keep is not None:
            checkpoints.append(keep)
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
