"""Per-token estimators of KL(p_θ ‖ p_ref) from samples of the policy.

Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html. With
y ~ p_θ and the log-ratio l = log p_θ(y_t) − log p_ref(y_t):

- ``k1 = l``                  unbiased, high variance, can be negative per sample;
- ``k2 = l² / 2``             biased (low bias near p_θ = p_ref), always ≥ 0;
- ``k3 = exp(−l) − 1 + l``    unbiased and always ≥ 0 (a Bregman divergence of log).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.choices import KL_ESTIMATORS
from rlhf_lightning.losses.masked import masked_sum


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate ``[B, T]`` from policy and reference log-probs ``[B, T]``.

    Samples are drawn from the policy. Padding positions are not masked here; reduce with
    :func:`sequence_kl` or a masked mean.
    """
    log_ratio = logprobs - ref_logprobs  # [B, T]
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(
        f"unknown KL estimator {estimator!r}; valid estimators: {', '.join(KL_ESTIMATORS)}"
    )


def sequence_kl(kl_tokens: Tensor, mask: Tensor) -> Tensor:
    """KL of each response ``[B]``: the masked sum over tokens of ``kl_tokens [B, T]``."""
    return masked_sum(kl_tokens, mask, dim=-1)


def kl_penalized_scores(scores: Tensor, kl_tokens: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Sequence-level objective ``[B]``: ``score − β · KL(y)``, the reward of REINFORCE/RLOO/GRPO.

    The result carries no gradient: it is a reward, not a loss.
    """
    return (scores - beta * sequence_kl(kl_tokens, mask)).detach()
