"""`RewardModelModule`: train r_φ(u, y) ∈ ℝ on preference pairs with the Bradley–Terry NLL.

    L(φ) = −mean log σ(r_φ(u, y⁺) − r_φ(u, y⁻) − m) + c · mean((r⁺ + r⁻)²)

(Bradley & Terry 1952; Ouyang et al. 2022 eq. 1; margin m as in Llama 2; centering c as in
Eisenstein et al. 2023.) Preference accuracy — how often r⁺ > r⁻ on held-out pairs — is the
headline metric. The mean/std of validation rewards are kept so the policy stage can normalise.
A unit of micro-batching is a pair (both sides travel together); scores are float32
(`reward_scores`), also under bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from rlhf_lightning.losses.bradley_terry import bradley_terry_loss
from rlhf_lightning.models.reward_scores import reward_scores
from rlhf_lightning.modules.optim import DECAY_EXCLUSIONS
from rlhf_lightning.modules.pairs import PairUnits
from rlhf_lightning.modules.supervised import MicroBatchedModule


class RewardModelModule(PairUnits, MicroBatchedModule):
    """Bradley–Terry training of a scalar-head sequence classifier.

    reward_model: an HF `...ForSequenceClassification` with `num_labels=1` (passed in, not saved
        as a hyperparameter). optimizer: a partial taking the parameters. scheduler: a partial
        taking (optimizer, num_training_steps=...), stepped every optimisation step.
    use_margin: subtract the pair's `margin` column inside the sigmoid. centering: coefficient c.
    bayes_accuracy: the task's ceiling on validation pairs, logged beside the accuracy when known.
    micro_batch_size (pairs) / max_tokens_per_micro_batch / max_grad_norm / no_decay:
        `MicroBatchedModule`; a unit is a pair (`PairUnits`, carrying its `margin`).
    shared_prefix: run a pair's prompt once for both sides (`reward_scores` with groups); the
        same scores and gradients, less work on long prompts.
    """

    stage_name = "rm"
    pair_columns = ("margin",)
    loss_name = "Bradley–Terry"
    numerical_fix = "lower rm.module.optimizer.lr, check the data's margins"

    def __init__(
        self,
        reward_model: nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        use_margin: bool = True,
        centering: float = 0.0,
        bayes_accuracy: float | None = None,
        micro_batch_size: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
        max_grad_norm: float | None = None,
        shared_prefix: bool = True,
        no_decay: Sequence[str] = DECAY_EXCLUSIONS,
    ):
        super().__init__(
            optimizer,
            scheduler,
            micro_batch_size,
            max_tokens_per_micro_batch,
            max_grad_norm,
            no_decay=no_decay,
        )
        # no_decay travels with the optimiser settings (a ListConfig would not load weights-only)
        self.save_hyperparameters(ignore=["reward_model", "optimizer", "scheduler", "no_decay"])
        self.reward_model = reward_model
        self.val_accuracy = BinaryAccuracy()
        self.val_loss, self.val_margin = MeanMetric(), MeanMetric()
        self.val_chosen, self.val_rejected = MeanMetric(), MeanMetric()
        self.val_reward, self.val_reward_sq = MeanMetric(), MeanMetric()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores [N] float32 of N sequences (read at each row's last real token). With
        `response_mask` and `shared_prefix`, rows i and N/2 + i (a pair) share their prompt."""
        groups = None
        if response_mask is not None and self.hparams.shared_prefix:
            half = torch.arange(input_ids.shape[0] // 2, device=input_ids.device)
            groups = torch.stack([half, half + len(half)], dim=1)  # [B, 2]: chosen, rejected
        return reward_scores(self.reward_model, input_ids, attention_mask, response_mask, groups)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for _, out in self.validation_parts(batch):
            chosen, rejected = out["chosen"], out["rejected"]
            self.val_loss.update(out["loss"], weight=chosen.numel())
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

    # --- MicroBatchedModule (units, select: `PairUnits`) ---------------------------------------
    def micro_loss(self, part: dict) -> dict[str, torch.Tensor]:
        chosen, rejected = self._score_pairs(part)
        return {
            "loss": self._loss(chosen, rejected, part["margin"]),
            "accuracy": (chosen > rejected).float().mean().detach(),
            "chosen": chosen.detach(),
            "rejected": rejected.detach(),
        }

    def trained_parameters(self):  # rm.trainable_layers / rm.lora: the rest is frozen
        return [p for p in self.reward_model.parameters() if p.requires_grad]

    def _score_pairs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = self(batch["input_ids"], batch["attention_mask"], batch.get("response_mask"))
        return rewards.chunk(2)

    def _loss(self, chosen, rejected, margin) -> torch.Tensor:
        return bradley_terry_loss(
            chosen, rejected, margin if self.hparams.use_margin else None, self.hparams.centering
        )
