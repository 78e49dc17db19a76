"""Policy-gradient algorithms as small configs over the pure functions in `losses/`.

All maximise J(θ) = E[r(u,y)] − β·KL(p_θ‖p_ref) with the KL in the reward (Ziegler et al. 2019):
  sequence score  s = r − β·Σ_t kl_t          (rloo, grpo, reinforce; `kl.penalty` irrelevant)
  token rewards   r_t = −β·kl_t, + r at EOS  (ppo with kl.penalty=token)
                  r_t = 0, + s at EOS        (ppo with kl.penalty=sequence)
With the k1 estimator, E[∇log p(y)·s] = ∇J exactly (the score-function identity), so the sampled
gradient is unbiased; k2/k3 in the reward are biased (tests report the cosine).

Defaults and sources: ppo — γ=1, λ=0.95, value clip 0.2, vf_coef 0.1, whitened advantages
(Ziegler et al. 2019; Huang et al. 2024 "The N+ implementation details of RLHF with PPO"), with
clip 0.1 (not 0.2: two epochs × two minibatches per rollout overshot a peaked optimum on the
oracle task) and k=4 samples per prompt (the sample budget of rloo/grpo per step); rloo — k=4
leave-one-out baseline (Ahmadian et al. 2024); grpo — group z-score (Shao et al. 2024); reinforce
— batch-mean baseline (Williams 1992). All use the PPO clipped surrogate, which at the first epoch
(ratio = 1) is the plain policy gradient. tests/test_gradient_check.py and test_closed_form.py
check all of this against the enumerated J(θ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_lightning.losses import (
    gae,
    grpo_advantages,
    kl_per_token,
    masked_whiten,
    reinforce_advantages,
    rloo_advantages,
    sequence_kl,
    token_rewards,
)


@dataclass
class Algorithm:
    """Hyperparameters of the policy update. `group_size` = samples per prompt (k)."""

    name: str = "rloo"
    group_size: int = 4
    epochs: int = 1
    minibatches: int = 1
    clip_range: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    clip_range_value: float = 0.2
    whiten_advantages: bool = False

    @property
    def uses_value_head(self) -> bool:
        return self.name == "ppo"

    @property
    def updates_per_rollout(self) -> int:
        """Optimiser steps per rollout (what Lightning's global_step counts)."""
        return 1 if self.name == "exact" else self.epochs * self.minibatches

    def kl_tokens(self, rollout, estimator: str) -> Tensor:
        """Per-token KL estimate on response tokens [B, T] (0 elsewhere)."""
        kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, estimator)
        return kl * rollout.response_mask

    def advantages(
        self, rollout, kl: Tensor, beta: float, penalty: str, all_reduce=None
    ) -> tuple[Tensor, Tensor | None]:
        """Advantages [B, T] on response tokens, and returns [B, T] for the value loss (PPO).

        `all_reduce` (a sum over processes) makes batch statistics (whitening, REINFORCE's
        baseline) global; group baselines (rloo, grpo) need none, as a group never spans ranks.
        """
        mask = rollout.response_mask
        if self.name == "ppo":
            return self._gae(rollout, kl, beta, penalty, all_reduce)
        scores = rollout.scores - beta * sequence_kl(kl, mask)  # [B]
        if self.name == "rloo":
            adv = rloo_advantages(scores, self.group_size)
        elif self.name == "grpo":
            adv = grpo_advantages(scores, self.group_size)
        else:
            adv = reinforce_advantages(scores, all_reduce=all_reduce)
        adv = adv[:, None] * mask  # [B, T]: the sequence advantage on every response token
        if self.whiten_advantages:
            adv = masked_whiten(adv, mask, all_reduce=all_reduce) * mask
        return adv, None

    def _gae(self, rollout, kl, beta, penalty, all_reduce=None) -> tuple[Tensor, Tensor]:
        start = rollout.prompt_width
        mask = rollout.response_mask[:, start:]  # [B, Tr], right-padded
        if penalty == "token":
            rewards = token_rewards(rollout.scores, kl[:, start:], mask, beta)
        else:
            seq = rollout.scores - beta * sequence_kl(kl, rollout.response_mask)
            rewards = token_rewards(seq, torch.zeros_like(mask, dtype=kl.dtype), mask, 0.0)
        adv, returns = gae(rewards, rollout.values[:, start:], mask, self.gamma, self.lam)
        if self.whiten_advantages:
            adv = masked_whiten(adv, mask, all_reduce=all_reduce) * mask
        pad = torch.zeros_like(rollout.response_mask[:, :start], dtype=adv.dtype)
        return torch.cat([pad, adv], 1), torch.cat([pad, returns], 1)
