"""What every stage does after `fit`: its validation metrics, then rank zero's work (saving)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rlhf_lightning.sharding import gathered_weights, is_sharded


def validation_metrics(trainer, module, datamodule) -> dict[str, float]:
    """The `val/*` metrics of the fitted model, validating once more when fit ended without them
    (resumed from a checkpoint written after the last step). Not under FSDP: a `validate` after
    `fit` sets the model up again without its sharding wrapper."""
    if "val/loss" not in trainer.callback_metrics and not is_sharded(trainer):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


@contextlib.contextmanager
def rank_zero_work(trainer) -> Iterator[bool]:
    """`with rank_zero_work(trainer) as mine: if mine: …` — every rank enters (under FSDP the
    whole weights are gathered for the block), rank zero works, and every rank waits at the end,
    so the next stage never reads an artifact still being written."""
    with gathered_weights(trainer):
        yield trainer.is_global_zero
    trainer.strategy.barrier("artifact")
