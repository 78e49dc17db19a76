"""The closed-form optimum of KL-regularised reward maximisation, on an enumerable response space.

Tables have one row per prompt u and one column per response y: log-probabilities [P, N] (each row
logsumexps to 0) and rewards [P, N]. The objective for a policy p is

    J(p) = mean_u Σ_y p(y|u) [ r(u,y) − β (log p(y|u) − log p_ref(y|u)) ]
         = mean_u ( E_p[r] − β KL(p ‖ p_ref) ),

maximised by the tilted reference (Korbak et al. 2022, https://arxiv.org/abs/2205.11275;
Rafailov et al. 2023 eq. 4, https://arxiv.org/abs/2305.18290)

    p*(y|u) = p_ref(y|u) exp(r(u,y)/β) / Z(u),   Z(u) = Σ_y p_ref(y|u) exp(r(u,y)/β),

with value J(p*) = mean_u β log Z(u). Since J(p) = J* − β mean_u KL(p ‖ p*), J(p) ≤ J* for every p.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rlhf_lightning.data.encoding import encode_prompt
from rlhf_lightning.models.logprobs import sequence_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlhf_lightning.tasks.oracle import OracleTask


def log_partition(ref_logprobs: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """log Z(u) = log Σ_y p_ref(y|u) exp(r(u,y)/β).  [P, N], [P, N] -> [P]."""
    return torch.logsumexp(ref_logprobs + rewards / beta, dim=-1)


def optimal_logprobs(ref_logprobs: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """log p*(y|u) = log p_ref(y|u) + r(u,y)/β − log Z(u).  [P, N], [P, N] -> [P, N]."""
    tilted = ref_logprobs + rewards / beta  # [P, N]
    return tilted - torch.logsumexp(tilted, dim=-1, keepdim=True)


def optimal_objective(ref_logprobs: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """J* = mean_u β log Z(u), a scalar."""
    return (beta * log_partition(ref_logprobs, rewards, beta)).mean()


def _plogq(p_logprobs: Tensor, values: Tensor) -> Tensor:
    """Σ_y p(y) values(y) per row, with 0·(anything) = 0 where p(y) = 0.  [P, N] -> [P]."""
    probs = p_logprobs.exp()
    # Zero the values first (not the product), so no 0·inf reaches the forward or backward pass.
    safe = torch.where(probs > 0, values, torch.zeros_like(values))
    return (probs * safe).sum(-1)


def kl_divergence(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """Exact KL(p ‖ q) = Σ_y p(y) (log p(y) − log q(y)) per row.  [P, N], [P, N] -> [P]."""
    return _plogq(p_logprobs, p_logprobs - q_logprobs)


def expected_reward(policy_logprobs: Tensor, rewards: Tensor) -> Tensor:
    """E_{y∼p}[r(u,y)] per prompt.  [P, N], [P, N] -> [P]."""
    return _plogq(policy_logprobs, rewards)


def objective(
    policy_logprobs: Tensor, ref_logprobs: Tensor, rewards: Tensor, beta: float
) -> Tensor:
    """J(p) = mean_u (E_p[r] − β KL(p ‖ p_ref)), a scalar, differentiable in `policy_logprobs`."""
    kl = kl_divergence(policy_logprobs, ref_logprobs)  # [P]
    return (expected_reward(policy_logprobs, rewards) - beta * kl).mean()


def optimal_frontier(
    ref_logprobs: Tensor, rewards: Tensor, betas: Sequence[float]
) -> list[dict[str, float]]:
    """The reward–KL frontier traced by p*_β: for each β, mean_u KL(p*_β ‖ p_ref) and E_{p*_β}[r].

    Returns one dict per β: {"beta", "kl", "reward", "objective"} (objective = J* = reward − β kl).
    """
    points = []
    for beta in betas:
        star = optimal_logprobs(ref_logprobs, rewards, beta)
        kl = kl_divergence(star, ref_logprobs).mean()
        reward = expected_reward(star, rewards).mean()
        points.append(
            {
                "beta": float(beta),
                "kl": float(kl),
                "reward": float(reward),
                "objective": float(optimal_objective(ref_logprobs, rewards, beta)),
            }
        )
    return points


def closure(j_start: float, j_end: float, j_star: float) -> float:
    """Fraction of the gap to the optimum closed: (J_end − J_start) / (J* − J_start)."""
    return (j_end - j_start) / (j_star - j_start)


def _enumerated_batch(
    tokenizer: PreTrainedTokenizerBase, task: OracleTask
) -> tuple[Tensor, Tensor, Tensor]:
    """input_ids, attention_mask, response_mask [P*N, T] of all (prompt, response), prompt-major."""
    responses = task.response_token_ids(tokenizer)  # [N, L]
    n, length = responses.shape
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in task.prompts()]
    width = max(len(ids) for ids in prompt_ids) + length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(prompt_ids) * n, width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for p, ids in enumerate(prompt_ids):
        rows = slice(p * n, (p + 1) * n)
        k = len(ids)
        input_ids[rows, :k] = torch.tensor(ids)
        input_ids[rows, k : k + length] = responses
        attention_mask[rows, : k + length] = 1
        response_mask[rows, k : k + length] = 1
    return input_ids, attention_mask, response_mask


def enumerated_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: OracleTask,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> Tensor:
    """Exact log p(y|u) of every response y for every prompt u, [P, N]; rows logsumexp to 0.

    One forward pass over all P*N sequences (or chunks of `batch_size` rows), scored with the
    task's allowed ids: the distribution that sampling with `AllowedTokensLogitsProcessor` draws
    from. Right padding keeps each row's positions 0..len−1, so padding changes nothing.
    Differentiable: wrap the call in `torch.no_grad()` for a frozen reference.
    """
    input_ids, attention_mask, response_mask = _enumerated_batch(tokenizer, task)
    device = next(model.parameters()).device
    allowed = task.allowed_token_ids(tokenizer).to(device)
    step = batch_size or input_ids.shape[0]
    sums = []
    for start in range(0, input_ids.shape[0], step):
        chunk = slice(start, start + step)
        logprobs, _ = sequence_logprobs(
            model,
            input_ids[chunk].to(device),
            attention_mask[chunk].to(device),
            response_mask[chunk].to(device),
            temperature,
            allowed,
        )  # [b, T]
        sums.append(logprobs.sum(-1))
    return torch.cat(sums).view(len(task.prompts()), -1)  # [P, N]
