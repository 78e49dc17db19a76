"""`SFTModule`: supervised fine-tuning, next-token cross-entropy on response tokens only.

    L(θ) = − Σ_t m_t log p_θ(y_t | u, y_<t) / Σ_t m_t,   m = response mask

a token mean over the global batch, whatever the micro-batch size (`MicroBatchedModule`). Logits
are computed at response positions only (`response_logprobs`). The result is the reference
policy p_ref of the policy stage and the initial p_θ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchmetrics import MeanMetric

from rlhf_lightning.losses.masked import masked_mean
from rlhf_lightning.models.logprobs import response_logprobs
from rlhf_lightning.modules.supervised import MicroBatchedModule, trimmed

KEYS = ("input_ids", "attention_mask", "response_mask")


class SFTModule(MicroBatchedModule):
    """policy: an HF causal LM (passed in). optimizer/scheduler: partials; micro-batching and
    clipping as in `MicroBatchedModule` (a unit is one demonstration, the loss a token mean)."""

    stage_name = "sft"
    loss_name = "SFT negative log-likelihood"
    numerical_fix = "lower sft.module.optimizer.lr"

    def __init__(
        self,
        policy: nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        micro_batch_size: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
        max_grad_norm: float | None = None,
    ):
        super().__init__(
            optimizer, scheduler, micro_batch_size, max_tokens_per_micro_batch, max_grad_norm
        )
        self.save_hyperparameters(ignore=["policy", "optimizer", "scheduler"])
        self.policy = policy
        self.val_loss = MeanMetric()

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean negative log-likelihood of the response tokens of `batch`."""
        logprobs = response_logprobs(
            self.policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        ).logprobs
        return -masked_mean(logprobs, batch["response_mask"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for part, out in self.validation_parts(batch):
            self.val_loss.update(out["loss"], weight=self.loss_count(part))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/perplexity", loss.exp(), sync_dist=True)
        self.val_loss.reset()

    def on_fit_start(self) -> None:
        self.policy.train()  # `from_pretrained` returns eval mode; dropout belongs to training

    # --- MicroBatchedModule: a unit is one demonstration; the loss a token mean -------------
    def units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0]

    def unit_lengths(self, batch: dict) -> list[int]:
        return batch["attention_mask"].sum(-1).tolist()

    def select(self, batch: dict, idx: torch.Tensor) -> dict:
        return trimmed(batch, idx, KEYS)

    def micro_loss(self, part: dict) -> dict[str, torch.Tensor]:
        return {"loss": self(part)}

    def loss_count(self, part: dict) -> torch.Tensor:
        return part["response_mask"].sum()

    def trained_parameters(self):
        return self.policy.parameters()
