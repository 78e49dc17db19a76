"""`GoldAccuracyCallback` (reward-model stage): how often the RM agrees with the gold reward.

The validation labels are noisy (sampled from Bradley–Terry under gold at temperature τ), so
`val/accuracy` measures agreement with noisy labels. On built-in tasks the gold reward is known,
and on the first `n_pairs` validation pairs with g(u,y⁺) ≠ g(u,y⁻) this logs

    val/gold_accuracy        = mean 1[(r_φ(u,y⁺) − r_φ(u,y⁻)) · (g(u,y⁺) − g(u,y⁻)) > 0]   (ties ½)
    val/gold_label_agreement = mean 1[g(u,y⁺) > g(u,y⁻)]   (how often the labels themselves agree)

after each validation epoch. A no-op (with one warning) when the data has no gold reward.
"""

from __future__ import annotations

import lightning as L
import torch

from rlhf_lightning.callbacks.common import gold_reward
from rlhf_lightning.data.preference import PreferenceCollator


class GoldAccuracyCallback(L.Callback):
    """n_pairs: validation pairs scored; batch_size: pairs per forward pass."""

    stages = ("rm",)

    def __init__(self, n_pairs: int = 512, batch_size: int = 64):
        self.n_pairs, self.batch_size = n_pairs, batch_size
        self._gold: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        gold = self.gold_margins(trainer)
        if gold is None:
            return
        margin, decided = gold  # [B] g⁺ − g⁻, [B] g⁺ ≠ g⁻
        encoded = trainer.datamodule.datasets["val"][: len(margin)]
        collate = PreferenceCollator(trainer.datamodule.tokenizer.pad_token_id)
        rewards = []
        with torch.no_grad():
            for start in range(0, len(encoded), self.batch_size):
                batch = collate(encoded[start : start + self.batch_size])
                scores = pl_module(
                    batch["input_ids"].to(pl_module.device),
                    batch["attention_mask"].to(pl_module.device),
                )  # [2b]
                chosen, rejected = scores.float().cpu().chunk(2)
                rewards.append(chosen - rejected)
        agree = torch.cat(rewards) * margin  # [B]
        score = (agree > 0).double() + 0.5 * (agree == 0).double()
        pl_module.log("val/gold_accuracy", float(score[decided].mean()), sync_dist=True)
        pl_module.log(
            "val/gold_label_agreement", float((margin[decided] > 0).double().mean()), sync_dist=True
        )

    def gold_margins(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """g(u,y⁺) − g(u,y⁻) [B] and the mask of pairs gold decides [B], computed once."""
        if self._gold is None:
            gold = gold_reward(trainer)
            if gold is None:
                return None
            datamodule = trainer.datamodule  # the pairs as its val loader rendered them
            records = datamodule.data.load("prefs", "val", datamodule.tokenizer).records
            records = records[: self.n_pairs]
            prompts = [r.prompt for r in records]
            margin = (
                torch.as_tensor(gold(prompts, [r.chosen for r in records])).float()
                - torch.as_tensor(gold(prompts, [r.rejected for r in records])).float()
            )
            self._gold = (margin, margin != 0)
        return self._gold
