"""One interface for every reward: `reward(prompts, responses) -> Tensor[B]` on text.

Rewards take text, not token ids, so a reward model whose tokenizer differs from the policy's
works unchanged: responses are decoded once and re-tokenised by each reward that needs it.
A rollout also knows which responses ended with a stop token (`ended`, False where cut at
`max_new_tokens`); rewards that read it (`reads_ended`: the learned RM, ensembles) take
`ended=` too, and `score` hands it on to those only, so any plain callable still works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class RewardFunction:
    """Scores (prompt, response) pairs. `setup(ctx)` binds what the run provides (task, paths)."""

    name: str = "reward"
    reads_ended: bool = False  # whether __call__ takes `ended` (responses closed by a stop token)

    def setup(self, ctx) -> RewardFunction:
        return self

    def to(self, device: torch.device) -> RewardFunction:
        return self

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


def score(
    reward: Callable, prompts: Sequence[str], responses: Sequence[str], ended=None
) -> torch.Tensor:
    """`reward(prompts, responses)` [B], with `ended=` [B] bool for rewards that read it."""
    if ended is not None and getattr(reward, "reads_ended", False):
        return reward(prompts, responses, ended=ended)
    return reward(prompts, responses)
