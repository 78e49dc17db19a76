"""The training progress bar: Lightning's own, described by steps where a stage counts steps.

A stage bounded by `max_steps` (the policy stage) runs with `max_epochs = -1`, which Lightning's
RichProgressBar (its default when `rich` is installed) prints as "Epoch 0/-2". There this bar reads
"Epoch 0 · ≤ 60 steps"; stages bounded by epochs keep Lightning's "Epoch 0/1".
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


class StageRichProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        if self.trainer.max_steps >= 0:
            description += f" · ≤ {self.trainer.max_steps} steps"
        return description


def progress_bar() -> RichProgressBar | TQDMProgressBar:
    """The bar Lightning would choose (rich if installed, else tqdm), with the description above."""
    return StageRichProgressBar() if _RICH_AVAILABLE else TQDMProgressBar()
