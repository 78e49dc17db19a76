"""Policy-gradient and PPO losses (Schulman et al. 2017, https://arxiv.org/abs/1707.06347), with
the per-token KL-penalised reward of Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593),
as in TRL.

All tensors are ``[B, T]`` over response tokens with ``mask`` 1 on real tokens, 0 on padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.losses.masked import masked_mean


def policy_gradient_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """L = −masked_mean(A · log p_θ(y_t)), A detached (REINFORCE / RLOO / GRPO).

    ``advantages`` is ``[B, T]``, or ``[B]`` sequence-level advantages broadcast over tokens.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [B, 1] broadcasts over T
    return -masked_mean(advantages.detach() * logprobs, mask)


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate L = masked_mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))).

    ρ = exp(log p_θ − log p_old) per token; A and log p_old are treated as constants.

    Returns:
        ``(loss [], clipfrac [], approx_kl [])``: clipfrac is the masked fraction of tokens where
        the clipped term is strictly larger (so it is the one taken and the gradient is 0);
        approx_kl = masked_mean(½ (log p − log p_old)²). The two diagnostics are detached.
    """
    log_ratio = logprobs - old_logprobs.detach()  # [B, T]
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask).detach()
    approx_kl = masked_mean(0.5 * log_ratio**2, mask).detach()
    return loss, clipfrac, approx_kl


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float,
) -> tuple[Tensor, Tensor]:
    """Clipped value loss: ½ · masked_mean(max((V − R)², (V_clip − R)²)).

    V_clip = V_old + clamp(V − V_old, −c, c). Returns ``(loss [], clipfrac [])``, clipfrac being the
    masked fraction of tokens where the clipped error is strictly larger (detached).
    """
    old_values, returns = old_values.detach(), returns.detach()
    values_clipped = old_values + torch.clamp(
        values - old_values, -clip_range_value, clip_range_value
    )
    error = (values - returns) ** 2  # [B, T]
    error_clipped = (values_clipped - returns) ** 2  # [B, T]
    loss = 0.5 * masked_mean(torch.maximum(error, error_clipped), mask)
    clipfrac = masked_mean((error_clipped > error).to(values.dtype), mask).detach()
    return loss, clipfrac


def last_token_index(mask: Tensor) -> Tensor:
    """Index ``[B]`` of the last response token of each row of ``mask [B, T]``."""
    if (mask.sum(dim=-1) == 0).any():
        raise ValueError("every row of mask needs at least one response token")
    positions = torch.arange(mask.shape[-1], device=mask.device)  # [T]
    return torch.where(mask.bool(), positions, -1).amax(dim=-1)  # [B]


def token_rewards(scores: Tensor, kl_tokens: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token reward ``[B, T]``: −β·kl_t on each response token, plus the score on the last one.

    r_t = −β · kl_t + 1[t = last real token] · score   (Ziegler et al. 2019, eq. 2);
    0 on padding. Rows may have different lengths or no padding. The result is detached.
    """
    mask = mask.to(kl_tokens.dtype)
    rewards = -beta * kl_tokens.detach() * mask  # [B, T]
    rows = torch.arange(rewards.shape[0], device=rewards.device)  # [B]
    rewards[rows, last_token_index(mask)] += scores.detach().to(rewards.dtype)
    return rewards
