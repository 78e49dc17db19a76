"""Pure tensor functions for RLHF losses: Bradley–Terry, KL estimators, advantages, PPO, DPO.

No Lightning here: everything is a function of tensors, unit-tested against hand-computed values.
"""

from rlhf_lightning.losses.advantages import (
    gae,
    grpo_advantages,
    reinforce_advantages,
    rloo_advantages,
)
from rlhf_lightning.losses.bradley_terry import bradley_terry_loss
from rlhf_lightning.losses.dpo import DPO_LOSSES, dpo_loss, implicit_accuracy
from rlhf_lightning.losses.kl import KL_ESTIMATORS, kl_penalized_scores, kl_per_token, sequence_kl
from rlhf_lightning.losses.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_lightning.losses.ppo import (
    last_token_index,
    policy_gradient_loss,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
)

__all__ = [
    "DPO_LOSSES",
    "KL_ESTIMATORS",
    "bradley_terry_loss",
    "dpo_loss",
    "gae",
    "grpo_advantages",
    "implicit_accuracy",
    "kl_penalized_scores",
    "kl_per_token",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_gradient_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_advantages",
    "rloo_advantages",
    "sequence_kl",
    "token_rewards",
]
