"""The loggers of a run: one Lightning logger per stage, wandb runs grouped by pipeline or sweep.

Shared by `train.py` (`context.RunContext`) and `eval.py` (`evaluate.run`): `build_logger` makes the
logger of `conf/logger/<option>`, `finish_wandb` closes a wandb run so runs never share one, and
`sweep_names`/`in_multirun` say whether this process is a job of a Hydra multirun.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate


def build_logger(node, stage: str, group: str, name: str | None = None):
    """The Lightning logger of `conf/logger/<option>` for one stage (False for `logger=none`).

    wandb: one run per stage (`name`, default the stage), grouped by `group`; CSV and TensorBoard:
    one version folder per stage (`csv/<stage>/metrics.csv`, `tensorboard/<stage>/`)."""
    if not node or "_target_" not in node:
        return False
    if "WandbLogger" in node._target_:
        name = node.get("name") or name or stage
        logger = instantiate(node, group=node.get("group") or group, name=name, job_type=stage)
        # Lightning passes `anonymous=None` to wandb.init, which wandb 0.31 warns about on
        # every run ("The anonymous setting has no effect"); not passing it is the same run.
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        return logger
    if "CSVLogger" in node._target_ or "TensorBoardLogger" in node._target_:
        return instantiate(node, version=stage)
    return instantiate(node)


def finish_wandb() -> None:
    """Close the open wandb run, if any, so the next stage or sweep job starts its own."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def in_multirun() -> bool:
    """Whether this process is a job of a Hydra multirun (`python train.py -m …`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_names(stage: str) -> tuple[str | None, str | None]:
    """(group, name) for a job of a Hydra multirun: the sweep folder, the stage plus swept values."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None, None
    hydra_cfg = HydraConfig.get()
    swept = ",".join(o for o in hydra_cfg.overrides.task if not o.startswith(("paths.", "hydra")))
    return f"sweep-{Path(hydra_cfg.sweep.dir).name}", f"{stage}[{swept}]"
