"""`LearningRateMonitor`: Lightning's, except that a run without a logger (`logger=none`) skips it.

Lightning's `LearningRateMonitor` raises at the start of training when the trainer has no logger,
which would make `logger=none` fail with the default callbacks; here it does nothing instead.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLearningRateMonitor


class LearningRateMonitor(_LightningLearningRateMonitor):
    """Learning rate (and momentum, if asked) of every optimiser; a no-op without loggers."""

    _active = False

    def on_train_start(self, trainer, *args: Any, **kwargs: Any) -> None:
        self._active = bool(trainer.loggers)
        if self._active:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args: Any, **kwargs: Any) -> None:
        if self._active:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args: Any, **kwargs: Any) -> None:
        if self._active:
            super().on_train_epoch_start(trainer, *args, **kwargs)
