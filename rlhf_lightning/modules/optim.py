"""The optimiser/schedule wiring shared by the supervised stages (SFT, reward model)."""

from __future__ import annotations

from collections.abc import Callable, Iterable


def optimizers_with_schedule(
    parameters: Iterable, optimizer: Callable, scheduler: Callable | None, num_training_steps: int
):
    """`configure_optimizers` output: the optimiser, plus a per-step schedule when configured.

    Schedules such as `transformers.get_cosine_schedule_with_warmup` need the run length, so the
    scheduler partial is called with `num_training_steps` (Lightning's estimated stepping batches).
    """
    opt = optimizer(parameters)
    if scheduler is None:
        return opt
    schedule = scheduler(opt, num_training_steps=num_training_steps)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
