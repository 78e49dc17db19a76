"""One interface for every reward: `reward(prompts, responses) -> Tensor[B]` on text.

Rewards take text, not token ids, so a reward model whose tokenizer differs from the policy's
works unchanged: responses are decoded once and re-tokenised by each reward that needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class RewardFunction:
    """Scores (prompt, response) pairs. `setup(ctx)` binds what the run provides (task, paths)."""

    name: str = "reward"

    def setup(self, ctx) -> RewardFunction:
        return self

    def to(self, device: torch.device) -> RewardFunction:
        return self

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError
