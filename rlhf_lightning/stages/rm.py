"""Stage `rm`: train the reward model on preference pairs, save it to `artifacts/<task>/rm`."""

from __future__ import annotations

from hydra.utils import instantiate

from rlhf_lightning.artifacts import save_model_artifact
from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.sharding import gathered_weights, is_sharded


def run_rm(ctx) -> dict:
    """Bradley–Terry training; the artifact records the mean/std of validation rewards."""
    cfg = ctx.cfg.rm
    datamodule = PreferenceDataModule(
        ctx.data,
        ctx.tokenizer,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=ctx.cfg.seed,
    )
    reward_model = ctx.model_spec.reward_model(ctx.tokenizer)
    module = instantiate(
        cfg.module, reward_model=reward_model, bayes_accuracy=ctx.data.bayes_accuracy("val")
    )
    trainer = ctx.trainer("rm", max_epochs=cfg.max_epochs)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ctx.ckpt_path("rm"))
    if "val/loss" not in trainer.callback_metrics and not is_sharded(trainer):
        # resumed from a checkpoint written after the last step, before validation (not under
        # FSDP: a validate after fit sets the model up again without its sharding wrapper)
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    result = {
        "accuracy": metrics.get("val/accuracy", float("nan")),
        "loss": metrics.get("val/loss", float("nan")),
    }
    if "val/bayes_accuracy" in metrics:
        result["bayes_accuracy"] = metrics["val/bayes_accuracy"]
    with gathered_weights(trainer):  # every rank enters (FSDP gathers the whole weights)
        if trainer.is_global_zero:
            stats = getattr(module, "reward_stats", None)  # None: no validation ran
            manifest = {"stage": "rm", "reward_stats": stats, "metrics": metrics}
            result["sha256"] = save_model_artifact(
                reward_model, ctx.tokenizer, ctx.artifact("rm", write=True), manifest
            )
            result["artifact"] = str(ctx.artifact("rm", write=True))
    trainer.strategy.barrier("artifact")  # other ranks read it in the next stage
    return result
