"""A weighted sum of reward functions, e.g. an RM ensemble or RM + gold (Coste et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_lightning.rewards.base import RewardFunction, score


class EnsembleReward(RewardFunction):
    """members: name → RewardFunction; weights: name → weight (default 1/len(members))."""

    name = "ensemble"
    reads_ended = True  # handed on to the members that read it
    reads_groups = True  # likewise

    def __init__(self, members: dict[str, RewardFunction], weights: dict[str, float] | None = None):
        self.members = dict(members)
        default = 1.0 / len(self.members)
        self.weights = {k: float((weights or {}).get(k, default)) for k in self.members}

    def setup(self, ctx) -> EnsembleReward:
        for member in self.members.values():
            member.setup(ctx)
        return self

    def to(self, device) -> EnsembleReward:
        for member in self.members.values():
            member.to(device)
        return self

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], ended=None, group_size: int = 1
    ) -> torch.Tensor:
        return sum(
            w * score(self.members[k], prompts, responses, ended, group_size)
            for k, w in self.weights.items()
        )
