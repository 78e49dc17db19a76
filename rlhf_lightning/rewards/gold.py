"""The task's gold reward (the simulated human): for evaluation, or to optimise it directly."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.rewards.base import RewardFunction


class GoldReward(RewardFunction):
    name = "gold"

    def __init__(self):
        self.task = None

    def setup(self, ctx) -> GoldReward:
        if ctx.data.task is None:
            raise ConfigError(
                "reward=gold needs a built-in task with a gold reward (data=task task=reviews|oracle); "
                "your own data has none: use reward=learned"
            )
        self.task = ctx.data.task
        return self

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return torch.as_tensor(
            self.task.gold_reward(list(prompts), list(responses)), dtype=torch.float32
        )
