"""Bradley–Terry reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022).

With P(y⁺ ≻ y⁻ | u) = σ(r(u, y⁺) − r(u, y⁻)), the negative log-likelihood of a batch of preference
pairs is ``−mean log σ(r⁺ − r⁻)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    reward_chosen: Tensor,
    reward_rejected: Tensor,
    margin: Tensor | None = None,
    centering: float = 0.0,
) -> Tensor:
    """L = −mean log σ(r⁺ − r⁻ − m) + centering · mean((r⁺ + r⁻)²).

    Args:
        reward_chosen: ``[B]`` rewards r⁺ of the preferred responses.
        reward_rejected: ``[B]`` rewards r⁻ of the rejected responses.
        margin: optional ``[B]`` margins m: the chosen response must win by at least m
            (Llama 2, Touvron et al. 2023, https://arxiv.org/abs/2307.09288; TRL RewardTrainer).
        centering: weight of the penalty that keeps rewards centred on 0, which the BT likelihood
            leaves free (Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244). 0 disables it.

    Returns:
        ``[]`` scalar loss. ``logsigmoid`` keeps it finite for any reward difference.
    """
    logits = reward_chosen - reward_rejected  # [B]
    if margin is not None:
        logits = logits - margin
    loss = -F.logsigmoid(logits).mean()
    if centering:
        loss = loss + centering * torch.mean((reward_chosen + reward_rejected) ** 2)
    return loss
