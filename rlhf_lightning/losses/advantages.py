"""Advantage estimators. Pure functions; outputs carry no gradient (they are targets, not losses).

Sequence-level estimators (REINFORCE, RLOO, GRPO) take one score per response ``[B]``; the group
estimators expect the ``k`` samples of one prompt to be adjacent: ``scores.view(-1, k)`` has one
prompt per row. Token-level GAE serves PPO with a value head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

    δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   returns R_t = A_t + V_t.

    Args:
        rewards, values: ``[B, T]`` per-token rewards and value estimates of the response tokens.
        mask: ``[B, T]`` 1 on response tokens, 0 on right padding. The episode ends after the last
            real token, so V and A after it are 0; whatever ``rewards``/``values`` hold on padding
            is ignored.
        gamma: discount γ; lam: GAE λ (λ=0 gives one-step TD, λ=1 Monte-Carlo returns minus V).

    Returns:
        ``(advantages [B, T], returns [B, T])``, both 0 on padding and detached.
    """
    mask = mask.to(values.dtype)
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("gae expects right-padded masks (1s then 0s in each row)")
    rewards = rewards.detach() * mask  # [B, T]
    values = values.detach() * mask  # [B, T]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # [B]; V after the last token is 0
    next_advantage = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # On padding delta = 0 and next_advantage = 0, so padding stays 0 and never leaks back.
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def _grouped(scores: Tensor, group_size: int, method: str) -> Tensor:
    """View ``scores [B]`` as ``[B / k, k]``, one prompt per row, checking the layout."""
    if scores.dim() != 1:
        raise ValueError(f"{method} expects scores of shape [B] (got {tuple(scores.shape)})")
    if group_size < 2:
        raise ValueError(
            f"{method} needs group_size >= 2 samples per prompt for a baseline (got {group_size})"
        )
    if scores.numel() % group_size:
        raise ValueError(
            f"{method}: {scores.numel()} scores are not divisible by group_size {group_size}"
        )
    return scores.detach().view(-1, group_size)  # [B / k, k]


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740).

    a_i = s_i − mean_{j≠i} s_j = k/(k−1) · (s_i − mean_j s_j) within each group of k samples.
    ``scores [B]`` → ``[B]``.
    """
    groups = _grouped(scores, group_size, "RLOO")  # [B / k, k]
    leave_one_out = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)  # [B / k, k]
    return (groups - leave_one_out).reshape(-1)


def grpo_advantages(
    scores: Tensor, group_size: int, eps: float = 1e-6, scale: bool = True
) -> Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300).

    a_i = (s_i − mean_group) / (std_group + eps), or ``s_i − mean_group`` with ``scale=False``
    (Liu et al. 2025, Dr. GRPO, drop the division). std is the unbiased (Bessel-corrected) sample
    standard deviation, as ``torch.std`` and TRL's GRPOTrainer compute it; a group of equal scores
    gets advantage 0. ``scores [B]`` → ``[B]``.
    """
    groups = _grouped(scores, group_size, "GRPO")  # [B / k, k]
    centred = groups - groups.mean(dim=1, keepdim=True)  # [B / k, k]
    if scale:
        centred = centred / (groups.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centred.reshape(-1)


def reinforce_advantages(
    scores: Tensor,
    baseline: str = "batch_mean",
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """REINFORCE (Williams 1992) advantages ``[B]``: ``s − mean(s)`` over the batch, or ``s``.

    ``baseline="batch_mean"`` subtracts the batch mean (variance reduction, slightly biased through
    each sample's own share of the mean); ``baseline="none"`` returns the scores. ``all_reduce``
    (a sum over processes) makes the mean that of the global batch.
    """
    scores = scores.detach()
    if baseline == "batch_mean":
        if all_reduce is None:
            return scores - scores.mean()
        total = all_reduce(torch.stack([scores.sum(), scores.new_tensor(float(scores.numel()))]))
        return scores - total[0] / total[1]
    if baseline == "none":
        return scores
    raise ValueError(f"unknown REINFORCE baseline {baseline!r}; valid baselines: batch_mean, none")
