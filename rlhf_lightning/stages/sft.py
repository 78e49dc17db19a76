"""Stage `sft`: supervised fine-tuning on demonstrations, saved to `artifacts/<task>/sft`.

The saved model is the reference policy p_ref of the policy stage (and its initial policy).
"""

from __future__ import annotations

from hydra.utils import instantiate

from rlhf_lightning.artifacts import save_model_artifact
from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.sharding import gathered_weights, is_sharded


def run_sft(ctx) -> dict:
    cfg = ctx.cfg.sft
    datamodule = SFTDataModule(
        ctx.data,
        ctx.tokenizer,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=ctx.cfg.seed,
    )
    policy = ctx.model_spec.causal_lm(ctx.tokenizer)
    module = instantiate(cfg.module, policy=policy)
    trainer = ctx.trainer("sft", max_epochs=cfg.max_epochs)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ctx.ckpt_path("sft"))
    if "val/loss" not in trainer.callback_metrics and not is_sharded(trainer):
        # resumed from a checkpoint written after the last step, before validation (not under
        # FSDP: a validate after fit sets the model up again without its sharding wrapper)
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    result = {"loss": metrics.get("val/loss", float("nan"))}
    with gathered_weights(trainer):  # every rank enters (FSDP gathers the whole weights)
        if trainer.is_global_zero:
            manifest = {"stage": "sft", "metrics": metrics}
            result["sha256"] = save_model_artifact(
                policy, ctx.tokenizer, ctx.artifact("sft", write=True), manifest
            )
            result["artifact"] = str(ctx.artifact("sft", write=True))
    trainer.strategy.barrier("artifact")  # other ranks read it in the next stage
    return result
