"""`run_eval(cfg)`: the testable body of `eval.py` — evaluate, write the report, log it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from rlhf_lightning.config import validate_eval
from rlhf_lightning.loggers import build_logger, finish_wandb
from rlhf_lightning.run import files_to_open, quiet_third_party, to_dict

if TYPE_CHECKING:
    from rlhf_lightning.evaluate.context import EvalContext


def run_eval(cfg: DictConfig) -> float:
    """Evaluate per `cfg.mode`; return the headline number (gold win rate, else the proxy's; in
    `mode=rm` the preference accuracy), which a Hydra sweeper can optimise."""
    validate_eval(cfg)  # before the imports below: a bad value fails without paying for them
    quiet_third_party()
    import torch

    from rlhf_lightning.evaluate.context import EvalContext
    from rlhf_lightning.evaluate.report import summary_markdown, write_report

    torch.manual_seed(cfg.seed)  # sampling is keyed; this only fixes anything left unkeyed
    ctx = EvalContext(cfg)
    if cfg.mode == "policy":
        from rlhf_lightning.evaluate.policy import evaluate_policy

        result = evaluate_policy(ctx)
    else:
        from rlhf_lightning.evaluate.rm import evaluate_reward_model

        result = evaluate_reward_model(ctx)
    files = write_report(result, ctx.output_dir)
    print("\n" + summary_markdown(result))
    try:
        log_result(cfg, ctx, result, files)
    finally:
        finish_wandb()
    print(f"run directory: {ctx.output_dir.resolve()}")
    for line in files_to_open(ctx.output_dir.resolve()):
        print(line)
    return headline(result)


def headline(result: dict) -> float:
    if result["mode"] == "rm":
        return float(result["metrics"]["accuracy"]["mean"])
    judge = "gold" if "gold" in result["judges"] else result["proxy"]
    return float(result["win_rates"][f"policy_vs_reference/{judge}"]["mean"])


def log_result(cfg: DictConfig, ctx: EvalContext, result: dict, files: dict[str, Path]) -> None:
    """The scalars to the configured logger; wandb also gets the plots and the samples table,
    TensorBoard the plots and the report."""
    logger = build_logger(cfg.get("logger"), "eval", f"{ctx.data.name}-eval")
    if not logger:
        return
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from rlhf_lightning.evaluate.report import scalars

    values = scalars(result)
    logger.log_hyperparams(to_dict(cfg))
    pngs = [p for name, p in files.items() if name.endswith(".png")]
    if isinstance(logger, WandbLogger):
        import wandb

        extra = {f"eval/{p.stem}": wandb.Image(str(p)) for p in pngs}
        if result.get("samples"):
            columns = list(result["samples"][0])
            rows = [[s[c] for c in columns] for s in result["samples"]]
            extra["eval/samples"] = wandb.Table(columns=columns, data=rows)
        logger.experiment.log({**values, **extra})
        logger.experiment.summary.update(values)
        return
    logger.log_metrics(values, step=0)
    if isinstance(logger, TensorBoardLogger):
        from matplotlib.image import imread

        for p in pngs:
            logger.experiment.add_image(f"eval/{p.stem}", imread(p)[..., :3], dataformats="HWC")
        logger.experiment.add_text("eval/report", files["eval.md"].read_text())
    logger.save()
    logger.finalize("success")
