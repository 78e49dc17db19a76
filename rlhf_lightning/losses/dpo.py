"""Direct preference losses on a policy's log-ratios to a frozen reference: DPO, IPO, robust DPO.

The KL-regularised optimum p*(y|u) = p_ref(y|u) exp(r(u,y)/β) / Z(u), read backwards, gives
r(u,y) = β log p*(y|u)/p_ref(y|u) + β log Z(u). In the Bradley–Terry likelihood of a pair the
β log Z(u) cancels, so with the log-ratios ρ± = log p_θ(y±|u) − log p_ref(y±|u) and

    h = ρ⁺ − ρ⁻                       ([B], the implicit reward margin divided by β)

maximising the likelihood over p_θ instead of over a reward model gives DPO
(Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7):

    sigmoid  L = −(1 − ε) log σ(βh − γ) − ε log σ(−(βh − γ))     (ε = 0: DPO; ε > 0: cDPO)
    robust   L = [−(1 − ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε)
             (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409, eq. 10: unbiased under labels
             flipped with probability ε)
    ipo      L = (h̄ − 1/(2β))²,  h̄ = ρ⁺/|y⁺| − ρ⁻/|y⁻|
             (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17; log-ratios averaged over
             response tokens, as TRL does with the IPO authors' agreement)

γ ≥ 0 is a target margin (the implicit reward of y⁺ must beat y⁻'s by γ). At p_θ = p_ref every
ρ is 0: the sigmoid loss is log 2 (any ε), the IPO loss 1/(4β²). Implicit rewards are β·ρ±.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_lightning.choices import DPO_LOSSES


def dpo_sigmoid_loss(
    logratio_chosen: Tensor,
    logratio_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    margin: float = 0.0,
) -> Tensor:
    """Per-pair DPO loss −(1−ε) log σ(βh − γ) − ε log σ(γ − βh), h = ρ⁺ − ρ⁻.  [B], [B] -> [B]."""
    logits = beta * (logratio_chosen - logratio_rejected) - margin  # [B]
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_robust_loss(
    logratio_chosen: Tensor, logratio_rejected: Tensor, beta: float, label_smoothing: float
) -> Tensor:
    """Per-pair robust DPO loss [−(1−ε) log σ(βh) + ε log σ(−βh)]/(1−2ε).  [B], [B] -> [B]."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    logits = beta * (logratio_chosen - logratio_rejected)  # [B]
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def ipo_loss(
    logratio_chosen: Tensor,
    logratio_rejected: Tensor,
    beta: float,
    length_chosen: Tensor,
    length_rejected: Tensor,
) -> Tensor:
    """Per-pair IPO loss (ρ⁺/|y⁺| − ρ⁻/|y⁻| − 1/(2β))².  [B] × 4 -> [B]; lengths in tokens."""
    mean_chosen = logratio_chosen / length_chosen.clamp_min(1)  # [B]
    mean_rejected = logratio_rejected / length_rejected.clamp_min(1)  # [B]
    return (mean_chosen - mean_rejected - 1 / (2 * beta)) ** 2


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    margin: float = 0.0,
    length_chosen: Tensor | None = None,
    length_rejected: Tensor | None = None,
) -> dict[str, Tensor]:
    """The loss of `loss_type` from sequence log-probs log p(y|u) of policy and reference.

    Args: four ``[B]`` log-probabilities (summed over response tokens); β > 0; `loss_type` one of
    DPO_LOSSES; label_smoothing ε (sigmoid, robust); margin γ (sigmoid); response lengths ``[B]``
    (ipo only).

    Returns: {"loss": [] mean over pairs, "per_pair": [B], "logratio_chosen": [B] ρ⁺,
    "logratio_rejected": [B] ρ⁻, "reward_chosen": [B] βρ⁺, "reward_rejected": [B] βρ⁻}.
    """
    chosen = policy_chosen - reference_chosen  # [B] ρ⁺
    rejected = policy_rejected - reference_rejected  # [B] ρ⁻
    if loss_type == "sigmoid":
        per_pair = dpo_sigmoid_loss(chosen, rejected, beta, label_smoothing, margin)
    elif loss_type == "robust":
        per_pair = dpo_robust_loss(chosen, rejected, beta, label_smoothing)
    elif loss_type == "ipo":
        if length_chosen is None or length_rejected is None:
            raise ValueError("the ipo loss needs the response lengths")
        per_pair = ipo_loss(chosen, rejected, beta, length_chosen, length_rejected)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}: expected one of {list(DPO_LOSSES)}")
    return {
        "loss": per_pair.mean(),
        "per_pair": per_pair,
        "logratio_chosen": chosen,
        "logratio_rejected": rejected,
        "reward_chosen": beta * chosen.detach(),
        "reward_rejected": beta * rejected.detach(),
    }


def implicit_accuracy(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """Share of pairs whose implicit reward ranks y⁺ above y⁻, ties counting ½.  [B], [B] -> []."""
    wins = (reward_chosen > reward_rejected).float()
    ties = (reward_chosen == reward_rejected).float()
    return (wins + 0.5 * ties).mean() if wins.numel() else torch.zeros(())
