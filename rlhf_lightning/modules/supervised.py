"""`MicroBatchedModule`: one optimiser step per data batch, in micro-batches (SFT, RM, DPO).

The stages that learn from a fixed dataset share this step (manual optimisation):

    parts = plan(units of the batch, micro_batch_size | max_tokens_per_micro_batch)
    zero_grad; accumulate(global-mean loss over parts); clip to max_grad_norm; step; schedule

A subclass says what a unit is (a sequence for SFT, a pair for the RM and DPO), how to cut a
sub-batch out (`select`), and the loss of one sub-batch as a mean over what it averages
(`micro_loss`, `loss_count`: tokens for SFT, pairs for the RM). `microbatch.accumulate` weights
each part by its count, so the step is the full-batch step whatever the micro-batch size.
Validation goes through the same parts (no grad), so it fits wherever training fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch

from rlhf_lightning.fsdp2 import shard_trained
from rlhf_lightning.microbatch import accumulate, optimiser_step, plan, shape_on_failure
from rlhf_lightning.modules.optim import (
    DECAY_EXCLUSIONS,
    optimizers_with_schedule,
    weight_decay_groups,
)


class MicroBatchedModule(L.LightningModule):
    """Base class. optimizer/scheduler: partials (`modules/optim.py`). micro_batch_size: units
    per forward/backward (None: the whole batch). max_tokens_per_micro_batch: a padded-token
    budget instead (units grouped by length). max_grad_norm: global-norm clipping (None: off).
    no_decay: parameter kinds trained without weight decay (`optim.DECAY_EXCLUSIONS`)."""

    stage_name = "train"
    numerical_fix = "lower the learning rate"

    def __init__(
        self,
        optimizer: Callable,
        scheduler: Callable | None = None,
        micro_batch_size: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
        max_grad_norm: float | None = None,
        no_decay: Sequence[str] = DECAY_EXCLUSIONS,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.max_grad_norm = max_grad_norm
        self.no_decay = tuple(no_decay)

    # --- what a subclass defines -----------------------------------------------------------
    def units(self, batch: dict) -> int:
        raise NotImplementedError

    def unit_lengths(self, batch: dict) -> list[int]:
        raise NotImplementedError

    def select(self, batch: dict, idx: torch.Tensor) -> dict:
        raise NotImplementedError

    def micro_loss(self, part: dict) -> dict[str, torch.Tensor]:
        """{"loss": mean over the part's units (with grad), other keys: detached means}."""
        raise NotImplementedError

    def loss_count(self, part: dict) -> torch.Tensor | float:
        raise NotImplementedError

    def trained_parameters(self):
        raise NotImplementedError

    def configure_model(self) -> None:
        # trainer=fsdp: FSDP2 units over the trained network (a no-op under other strategies)
        shard_trained(self)

    # --- the shared step --------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        stats = optimiser_step(
            self,
            self.optimizers(),
            lambda: accumulate(
                self,
                self.parts(batch),
                self.micro_loss,
                self.loss_count,
                what=f"train/loss ({self.loss_name})",
                fix=self.numerical_fix,
            ),
            self.max_grad_norm,
            self.lr_schedulers(),
        )
        n = self.units(batch)
        for key, value in stats.items():
            self.log(f"train/{key}", value, prog_bar=key == "loss", batch_size=n, sync_dist=True)

    def parts(self, batch: dict) -> list[dict]:
        """The micro-batches of `batch`, each cut to its own longest sequence."""
        lengths = self.unit_lengths(batch)
        idx = plan(len(lengths), self.micro_batch_size, lengths, self.max_tokens_per_micro_batch)
        return [self.select(batch, i) for i in idx]

    def validation_parts(self, batch: dict):
        """(part, its outputs) for each micro-batch of a validation batch, without grad."""
        for part in self.parts(batch):
            with shape_on_failure(self, part):
                yield part, self.micro_loss(part)

    loss_name = "loss"

    def configure_optimizers(self):
        return optimizers_with_schedule(
            weight_decay_groups(self, self.trained_parameters(), self.no_decay),
            self.optimizer_factory,
            self.scheduler_factory,
            int(self.trainer.estimated_stepping_batches),
        )


def trimmed(batch: dict, rows: torch.Tensor, keys: tuple[str, ...]) -> dict:
    """Rows `rows` of the [N, T] tensors `keys`, cut to the last column any of them attends to
    (right padding), from `batch["attention_mask"]`."""
    mask = batch["attention_mask"][rows]
    width = int(mask.sum(-1).max()) if len(rows) else 0
    return {k: batch[k][rows][:, :width] for k in keys}
