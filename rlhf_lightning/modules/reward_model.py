"""`RewardModelModule`: train r_φ(u, y) ∈ ℝ on preference pairs with the Bradley–Terry NLL.

    L(φ) = −mean log σ(r_φ(u, y⁺) − r_φ(u, y⁻) − m) + c · mean((r⁺ + r⁻)²)

(Bradley & Terry 1952; Ouyang et al. 2022 eq. 1; margin m as in Llama 2; centering c as in
Eisenstein et al. 2023.) Preference accuracy — how often r⁺ > r⁻ on held-out pairs — is the
headline metric. The mean/std of validation rewards are kept so the policy stage can normalise.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from rlhf_lightning.distributed import global_mean_scale
from rlhf_lightning.errors import NumericalError
from rlhf_lightning.losses.bradley_terry import bradley_terry_loss
from rlhf_lightning.modules.optim import optimizers_with_schedule


class RewardModelModule(L.LightningModule):
    """Bradley–Terry training of a scalar-head sequence classifier.

    reward_model: an HF `...ForSequenceClassification` with `num_labels=1` (passed in, not saved
        as a hyperparameter). optimizer: a partial taking the parameters. scheduler: a partial
        taking (optimizer, num_training_steps=...), stepped every optimisation step.
    use_margin: subtract the pair's `margin` column inside the sigmoid. centering: coefficient c.
    bayes_accuracy: the task's ceiling on validation pairs, logged beside the accuracy when known.
    """

    def __init__(
        self,
        reward_model: nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        use_margin: bool = True,
        centering: float = 0.0,
        bayes_accuracy: float | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["reward_model", "optimizer", "scheduler"])
        self.reward_model = reward_model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.val_accuracy = BinaryAccuracy()
        self.val_loss, self.val_margin = MeanMetric(), MeanMetric()
        self.val_chosen, self.val_rejected = MeanMetric(), MeanMetric()
        self.val_reward, self.val_reward_sq = MeanMetric(), MeanMetric()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores [N] of N sequences (read by the model at each row's last non-pad token)."""
        return self.reward_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        chosen, rejected = self._score_pairs(batch)
        loss = self._loss(chosen, rejected, batch["margin"])
        if not torch.isfinite(loss):  # before backward: the last checkpoint stays a good one
            raise NumericalError(
                f"train/loss (Bradley–Terry) is {loss.item()} at step {self.global_step}; the last "
                "good checkpoint is kept (lower rm.module.optimizer.lr, check the data's margins)"
            )
        n = chosen.numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        accuracy = (chosen > rejected).float().mean()
        self.log("train/accuracy", accuracy, batch_size=n, sync_dist=True)
        return loss * global_mean_scale(torch.tensor(n, device=loss.device))  # see distributed.py

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        chosen, rejected = self._score_pairs(batch)
        loss = self._loss(chosen, rejected, batch["margin"])
        self.val_loss.update(loss, weight=chosen.numel())
        self.val_accuracy.update(
            torch.sigmoid(chosen - rejected), torch.ones_like(chosen, dtype=torch.long)
        )
        self.val_margin.update(chosen - rejected)
        self.val_chosen.update(chosen)
        self.val_rejected.update(rejected)
        both = torch.cat([chosen, rejected])
        self.val_reward.update(both)
        self.val_reward_sq.update(both**2)

    def on_validation_epoch_end(self) -> None:
        metrics = {
            "val/loss": self.val_loss,
            "val/accuracy": self.val_accuracy,
            "val/margin": self.val_margin,
            "val/reward_chosen": self.val_chosen,
            "val/reward_rejected": self.val_rejected,
        }
        for key, metric in metrics.items():
            self.log(key, metric.compute(), prog_bar=key == "val/accuracy", sync_dist=True)
            metric.reset()
        mean, mean_sq = self.val_reward.compute(), self.val_reward_sq.compute()
        self.reward_stats = {
            "mean": float(mean),
            "std": float((mean_sq - mean**2).clamp_min(1e-12).sqrt()),
        }
        self.val_reward.reset()
        self.val_reward_sq.reset()
        if self.hparams.bayes_accuracy is not None:
            self.log("val/bayes_accuracy", float(self.hparams.bayes_accuracy), sync_dist=True)

    def on_fit_start(self) -> None:
        self.reward_model.train()  # `from_pretrained` gives eval mode; dropout belongs to training

    def configure_optimizers(self):
        return optimizers_with_schedule(
            self.reward_model.parameters(),
            self.optimizer_factory,
            self.scheduler_factory,
            int(self.trainer.estimated_stepping_batches),
        )

    def _score_pairs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = self(batch["input_ids"], batch["attention_mask"])  # [2B]: chosen then rejected
        return rewards.chunk(2)

    def _loss(self, chosen, rejected, margin) -> torch.Tensor:
        return bradley_terry_loss(
            chosen, rejected, margin if self.hparams.use_margin else None, self.hparams.centering
        )
