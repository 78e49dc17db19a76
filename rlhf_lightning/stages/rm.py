"""Stage `rm`: train the reward model on preference pairs, save it to `artifacts/<task>/rm`."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rlhf_lightning.artifacts import require_artifact
from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.models.factory import keep_bottom_layers, train_top_layers
from rlhf_lightning.models.lora import lora_settings, reward_model_with_lora
from rlhf_lightning.stages.common import (
    best_weights,
    check_keep,
    rank_zero_work,
    restore_best,
    save_stage_artifact,
    validation_metrics,
)


def run_rm(ctx) -> dict:
    """Bradley–Terry training; the artifact's manifest records the mean/std of validation rewards
    and the max_length it trained at (the reward scores at it). rm.keep=best: the artifact holds
    the weights of the best validation (rm.monitor), validated again, the manifest says which."""
    cfg = ctx.cfg.rm
    datamodule = PreferenceDataModule(
        ctx.data,
        ctx.tokenizer,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=ctx.cfg.seed,
        length_group=cfg.length_group,
    )
    reward_model = ctx.model_spec.trainable(initial_reward_model(ctx))
    module = instantiate(
        cfg.module, reward_model=reward_model, bayes_accuracy=ctx.data.bayes_accuracy("val")
    )
    keeper = best_weights(ctx, "rm", cfg.get("keep", "last"), cfg.get("monitor", "val/loss"))
    trainer = ctx.trainer("rm", keep=keeper, max_epochs=cfg.max_epochs)
    check_keep(trainer, "rm", keeper)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ctx.ckpt_path("rm"))
    kept = restore_best(trainer, module, datamodule, keeper, "rm")  # keep=best: reload, validate
    metrics = validation_metrics(trainer, module, datamodule)
    result = {
        "accuracy": metrics.get("val/accuracy", float("nan")),
        "loss": metrics.get("val/loss", float("nan")),
    }
    if "val/bayes_accuracy" in metrics:
        result["bayes_accuracy"] = metrics["val/bayes_accuracy"]
    with rank_zero_work(trainer) as mine:
        if mine:
            stats = getattr(module, "reward_stats", None)  # None: no validation ran
            manifest = {  # max_length: what `LearnedReward` scores at, as trained
                "stage": "rm",
                "reward_stats": stats,
                "metrics": metrics,
                "max_length": int(cfg.max_length),
            }
            if kept is not None:  # rm.keep=best: which validation's weights these are
                manifest["kept"] = kept
            save_stage_artifact(ctx, "rm", reward_model, manifest, result)  # rm.lora merged in
    return result


def initial_reward_model(ctx):
    """The network the RM stage starts from: the spec's model, or with `rm.init_from_sft` the SFT
    artifact's backbone under a new score head; `rm.score_init_std` re-draws the head.
    `rm.num_layers` keeps only the bottom blocks (the head reads a middle layer);
    `rm.trainable_layers` freezes all but the top blocks; `rm.lora` trains an adapter instead."""
    cfg = ctx.cfg.rm
    if cfg.init_from_sft:
        sft = require_artifact(ctx.artifact("sft"), "SFT", "python train.py stage=sft")
        model = ctx.model_spec.reward_model_from_sft(ctx.tokenizer, sft)
    else:
        model = ctx.model_spec.reward_model(ctx.tokenizer)
    if cfg.score_init_std is not None:
        redraw_score_head(model, cfg.score_init_std)
    if cfg.get("num_layers") is not None:
        keep_bottom_layers(model, cfg.num_layers)
    if cfg.get("trainable_layers") is not None:
        train_top_layers(model, cfg.trainable_layers)
    if cfg.get("lora") is not None:
        model = reward_model_with_lora(model, lora_settings(OmegaConf.to_container(cfg.lora)))
    return model


def redraw_score_head(model, std: float) -> None:
    """Re-draw the [1, H] `score` head of HF's ...ForSequenceClassification ~ N(0, std²) (std 0:
    every score starts at 0; then no gradient reaches the backbone until the head grows)."""
    with torch.no_grad():
        model.score.weight.normal_(0.0, std)
