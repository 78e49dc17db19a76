"""`SFTModule`: supervised fine-tuning, next-token cross-entropy on response tokens only.

    L(θ) = − Σ_t m_t log p_θ(y_t | u, y_<t) / Σ_t m_t,   m = response mask

The result is the reference policy p_ref of the policy stage and the initial p_θ.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from rlhf_lightning.distributed import global_mean_scale
from rlhf_lightning.errors import NumericalError
from rlhf_lightning.losses.masked import masked_mean
from rlhf_lightning.models.logprobs import sequence_logprobs
from rlhf_lightning.modules.optim import optimizers_with_schedule


class SFTModule(L.LightningModule):
    """policy: an HF causal LM (passed in). optimizer/scheduler: partials, as in the RM module."""

    def __init__(self, policy: nn.Module, optimizer: Callable, scheduler: Callable | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "optimizer", "scheduler"])
        self.policy = policy
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.val_loss = MeanMetric()

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean negative log-likelihood of the response tokens of `batch`."""
        logprobs, _ = sequence_logprobs(
            self.policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        )
        return -masked_mean(logprobs, batch["response_mask"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        if not torch.isfinite(loss):  # before backward: the last checkpoint stays a good one
            raise NumericalError(
                f"train/loss (SFT negative log-likelihood) is {loss.item()} at step "
                f"{self.global_step}; the last good checkpoint is kept (lower "
                "sft.module.optimizer.lr)"
            )
        n = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        return loss * global_mean_scale(batch["response_mask"].sum())  # see distributed.py

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_loss.update(self(batch), weight=batch["response_mask"].sum())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/perplexity", loss.exp(), sync_dist=True)
        self.val_loss.reset()

    def on_fit_start(self) -> None:
        self.policy.train()  # `from_pretrained` returns eval mode; dropout belongs to training

    def configure_optimizers(self):
        return optimizers_with_schedule(
            self.policy.parameters(),
            self.optimizer_factory,
            self.scheduler_factory,
            int(self.trainer.estimated_stepping_batches),
        )
