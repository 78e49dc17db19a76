"""What the stages share: building a module from its config node, the policy and frozen
reference, the validation metrics after `fit`, and rank zero's work (saving the artifact)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from rlhf_lightning.artifacts import content_hash, require_artifact, save_model_artifact
from rlhf_lightning.choices import MONITORS
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.models.lora import export_for_saving
from rlhf_lightning.resume import SafeCheckpointIO, checkpoint_dir
from rlhf_lightning.sharding import gathered_weights, is_sharded

REFERENCES = ("sft", "checkpoint")


def build_module(node: DictConfig, **objects):
    """The stage's LightningModule from its `module:` node (`_target_` and settings) and the
    objects the stage built (networks, reward, tokenizer, sampling settings, ...).

    `instantiate(node, _partial_=True)(**objects)`: the objects reach the module as they are
    (`instantiate(node, **objects)` would merge them into the config first, which turns a
    dataclass such as `GenerationSettings` or `Algorithm` into a DictConfig)."""
    return instantiate(node, _partial_=True)(**objects)


def save_stage_artifact(ctx, stage: str, model, manifest: dict, result: dict) -> None:
    """Save `model` (a plain HF model: a LoRA adapter merged into a copy) with the run's tokenizer
    and `manifest` to `artifacts/<task>/<stage>` (atomically); record its content hash and path
    in `result` (`sha256`, `artifact`). Rank zero only (inside `rank_zero_work`)."""
    path = ctx.artifact(stage, write=True)
    result["sha256"] = save_model_artifact(export_for_saving(model), ctx.tokenizer, path, manifest)
    result["artifact"] = str(path)


def policy_and_reference(ctx, stage: str, reference: str):
    """(policy, frozen reference, identity) of the policy or DPO stage, both from one source.

    reference=sft: the SFT artifact (`artifacts/<task>/sft`, made by `stage=sft`).
    reference=checkpoint: `model.name_or_path`'s own weights (an instruct model needs no SFT stage).
    identity: what the stage's artifact manifest records of its reference (which, where, hash).
    """
    if reference not in REFERENCES:
        raise ConfigError(
            f"{stage}.reference={reference!r} is invalid: expected one of {REFERENCES}"
        )
    spec = ctx.model_spec
    if reference == "checkpoint":
        if spec.is_tiny:
            raise ConfigError(
                f"{stage}.reference=checkpoint needs a pretrained model (model=smollm2, or model=hf "
                f"model.name_or_path=…); model=tiny is built with random weights: use "
                f"{stage}.reference=sft after `python train.py stage=sft`"
            )
        path = None  # the spec's own checkpoint
        where = spec.name_or_path
    else:
        path = where = require_artifact(ctx.artifact("sft"), "SFT", "python train.py stage=sft")
    policy, frozen = spec.policy_and_reference(ctx.tokenizer, path=path)
    identity = {"reference": reference, "reference_path": str(where)}
    if reference == "sft":
        identity["sft_sha256"] = content_hash(where)
    elif Path(where).is_dir():
        identity["reference_sha256"] = content_hash(Path(where))
    return spec.trainable(policy), frozen, identity


def validation_metrics(trainer, module, datamodule) -> dict[str, float]:
    """The `val/*` metrics of the fitted model, validating once more when fit ended without them
    (resumed from a checkpoint written after the last step). Not under FSDP: a `validate` after
    `fit` sets the model up again without its sharding wrapper."""
    if "val/loss" not in trainer.callback_metrics and not is_sharded(trainer):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


class BestWeights(ModelCheckpoint):
    """ModelCheckpoint that, resumed into a new run dir (`ckpt_path=last` opens one), still knows
    the best score so far — Lightning reloads only the path when the folder changed, and the first
    validation after the resume would then replace a better best.ckpt."""

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("best_model_path"):  # the previous run's best.ckpt stays where it is
            self.best_model_score = state_dict["best_model_score"]
            self.best_k_models = dict(state_dict.get("best_k_models", {}))
            self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
            self.kth_value = state_dict.get("kth_value", self.kth_value)


def best_weights(ctx, stage: str, keep: str, monitor: str) -> BestWeights | None:
    """keep=best: a checkpoint callback that writes the weights of the best validation so far
    (lowest val/loss, highest val/accuracy) to checkpoints/<stage>/best.ckpt — weights only (4
    bytes a parameter), written atomically by Lightning, its path and score kept in last.ckpt so a
    resumed run still knows it. keep=last: None (the artifact holds the weights training ended
    with)."""
    if keep == "last":
        return None
    return BestWeights(
        dirpath=str(checkpoint_dir(ctx.output_dir, stage)),
        filename="best",
        monitor=monitor,
        mode=MONITORS[monitor],
        save_top_k=1,
        save_weights_only=True,
        save_on_train_epoch_end=False,  # at each validation's end: the weights it scored
        enable_version_counter=False,  # one best.ckpt, replaced
    )


def check_keep(trainer, stage: str, keeper) -> None:
    """Refuse keep=best before training (once the Trainer is built, as `sharding.check_strategy`
    refuses ZeRO-3) where the weights are sharded (FSDP): a sharded best.ckpt could not be loaded
    back into the module and validated after `fit`."""
    if keeper is not None and is_sharded(trainer):
        raise ConfigError(
            f"{stage}.keep=best is not supported under FSDP (sharded weights): use "
            f"{stage}.keep=last, or trainer=ddp"
        )


def restore_best(trainer, module, datamodule, keeper, stage: str) -> dict | None:
    """Load best.ckpt's weights into `module` (every rank) and validate them again (not logged),
    so the stage's val/* metrics and the module's statistics are those of the kept weights. Returns
    what the manifest records ({weights, monitor, score, step, steps}); None with keep=last or
    when no validation ran (the last weights stay)."""
    if keeper is None:
        return None
    if not keeper.best_model_path:
        print(f"[{stage}] keep=best: no validation ran, so the artifact holds the last weights")
        return None
    checkpoint = SafeCheckpointIO().load_checkpoint(keeper.best_model_path, map_location="cpu")
    module.load_state_dict(checkpoint["state_dict"])
    steps, loggers = trainer.global_step, trainer.loggers
    trainer.loggers = []  # the logged curves stay training's; the manifest says what was kept
    try:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        trainer.loggers = loggers
    kept = {
        "weights": "best",
        "monitor": keeper.monitor,
        "score": float(keeper.best_model_score),
        "step": int(checkpoint["global_step"]),
        "steps": int(steps),
    }
    print(
        f"[{stage}] keep=best: the weights of step {kept['step']} of {steps} "
        f"({kept['monitor']}={kept['score']:.4g}, the best validation)"
    )
    return kept


@contextlib.contextmanager
def rank_zero_work(trainer) -> Iterator[bool]:
    """`with rank_zero_work(trainer) as mine: if mine: …` — every rank enters (under FSDP the
    whole weights are gathered for the block), rank zero works, and every rank waits at the end,
    so the next stage never reads an artifact still being written."""
    with gathered_weights(trainer):
        yield trainer.is_global_zero
    trainer.strategy.barrier("artifact")
