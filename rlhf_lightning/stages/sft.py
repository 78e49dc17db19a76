"""Stage `sft`: supervised fine-tuning on demonstrations, saved to `artifacts/<task>/sft`.

The saved model is the reference policy p_ref of the policy stage (and its initial policy).
"""

from __future__ import annotations

from hydra.utils import instantiate

from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.stages.common import rank_zero_work, save_stage_artifact, validation_metrics


def run_sft(ctx) -> dict:
    cfg = ctx.cfg.sft
    datamodule = SFTDataModule(
        ctx.data,
        ctx.tokenizer,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=ctx.cfg.seed,
    )
    policy = ctx.model_spec.trainable(ctx.model_spec.causal_lm(ctx.tokenizer))
    module = instantiate(cfg.module, policy=policy)
    trainer = ctx.trainer("sft", max_epochs=cfg.max_epochs)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ctx.ckpt_path("sft"))
    metrics = validation_metrics(trainer, module, datamodule)
    result = {"loss": metrics.get("val/loss", float("nan"))}
    with rank_zero_work(trainer) as mine:
        if mine:
            save_stage_artifact(ctx, "sft", policy, {"stage": "sft", "metrics": metrics}, result)
    return result
