"""One interface for every reward: `reward(prompts, responses) -> Tensor[B]` on text.

Rewards take text, not token ids, so a reward model whose tokenizer differs from the policy's
works unchanged: responses are decoded once and re-tokenised by each reward that needs it.
A rollout also knows which responses ended with a stop token (`ended`, False where cut at
`max_new_tokens`); rewards that read it (`reads_ended`: the learned RM, ensembles) take
`ended=` too, and `score` hands it on to those only, so any plain callable still works.
Likewise a rollout knows its group size k (k samples per prompt, in runs of k rows): rewards
that run a prompt once per group (`reads_groups`: the learned RM, ensembles) take `group_size=`.

`setup(ctx)` reads a `RewardContext`: a training run (`context.RunContext`), an evaluation
(`evaluate.context.EvalContext`) or a benchmark's stand-in all serve it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch


class RewardContext(Protocol):
    """What a reward's `setup(ctx)` reads of the run it serves."""

    data: Any  # `data.spec.DataSpec` (the gold reward reads its `.task`)
    model_spec: Any  # `models.factory.ModelSpec`: loads the reward model's checkpoint
    tokenizer: Any  # the policy's tokenizer (a foreign RM drops its stop texts), or None

    def artifact(self, stage: str) -> Path:
        """The folder of `stage`'s artifact (the learned reward reads "rm")."""
        ...


class RewardFunction:
    """Scores (prompt, response) pairs. `setup(ctx)` binds what the run provides (task, paths)."""

    name: str = "reward"
    reads_ended: bool = False  # whether __call__ takes `ended` (responses closed by a stop token)
    reads_groups: bool = False  # whether __call__ takes `group_size` (prompts in runs of k)

    def setup(self, ctx: RewardContext) -> RewardFunction:
        return self

    def to(self, device: torch.device) -> RewardFunction:
        return self

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


def score(
    reward: Callable,
    prompts: Sequence[str],
    responses: Sequence[str],
    ended=None,
    group_size: int = 1,
) -> torch.Tensor:
    """`reward(prompts, responses)` [B], with `ended=` [B] bool and `group_size=` k (rows in runs
    of k samples of one prompt) for the rewards that read them."""
    extra = {}
    if ended is not None and getattr(reward, "reads_ended", False):
        extra["ended"] = ended
    if group_size > 1 and getattr(reward, "reads_groups", False):
        extra["group_size"] = group_size
    return reward(prompts, responses, **extra)
