"""Per-token log-probabilities and entropies of a causal LM, optionally restricted to allowed ids.

Every stage scores responses the same way: one forward pass over `[bos] + prompt + response`, the
logit at position t−1 predicts the token at position t, and only response positions count.

Restriction to a set of allowed ids A (the `oracle` task's words) renormalises the softmax over A:
    log p_A(y_t | y_<t) = z_{y_t}/T − log Σ_{a∈A} exp(z_a/T),   and −inf for y_t ∉ A,
which is exactly the distribution `generate()` samples from with `AllowedTokensLogitsProcessor`
(custom processors run before the temperature/top-k warpers in transformers' `generate`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LogitsProcessor


def _restrict(logits: Tensor, allowed_token_ids: Tensor | None) -> Tensor:
    """Logits over the allowed ids only, [..., K] (a small copy), or unchanged, [..., V]."""
    if allowed_token_ids is None:
        return logits
    return logits[..., allowed_token_ids.to(logits.device)]


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    allowed_token_ids: Tensor | None = None,
) -> Tensor:
    """log softmax(logits / T)[label] at every position, restricted to `allowed_token_ids` if given.

    Shapes: logits [B, T, V], labels [B, T] -> [B, T] float32. Labels outside the allowed set
    get −inf.
    Memory: gathers the label logit and subtracts a log-normaliser, so no extra [B, T, V] tensor is
    kept (float32 logits: one `logsumexp`; half precision: row by row in float32, as TRL does).
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float() / temperature  # [B, T]
    restricted = _restrict(logits, allowed_token_ids)  # [B, T, K] or [B, T, V]
    if restricted.dtype in (torch.float32, torch.float64):
        log_norm = torch.logsumexp(restricted.float() / temperature, dim=-1)  # [B, T]
    else:
        log_norm = torch.stack(
            [torch.logsumexp(row.float() / temperature, dim=-1) for row in restricted]
        )  # [B, T]
    logprobs = picked - log_norm
    if allowed_token_ids is not None:
        allowed = allowed_token_ids.to(labels.device)
        is_allowed = (labels.unsqueeze(-1) == allowed).any(-1)  # [B, T]
        logprobs = logprobs.masked_fill(~is_allowed, float("-inf"))
    return logprobs


def entropy_from_logits(
    logits: Tensor, temperature: float = 1.0, allowed_token_ids: Tensor | None = None
) -> Tensor:
    """Entropy H = −Σ_v p_v log p_v of softmax(logits / T) (over the allowed ids if given).

    Shapes: logits [B, T, V] -> [B, T] float32, in nats.
    """
    scaled = _restrict(logits, allowed_token_ids).float() / temperature  # [B, T, K|V]
    logp = torch.log_softmax(scaled, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class AllowedTokensLogitsProcessor(LogitsProcessor):
    """Sets every score outside `allowed_token_ids` to −inf, so `generate()` samples only those ids.

    Use as `model.generate(..., logits_processor=[AllowedTokensLogitsProcessor(ids)])`. The
    sampled distribution is then the renormalised one that
    `token_logprobs(..., allowed_token_ids=ids)` scores.
    """

    def __init__(self, allowed_token_ids: Tensor | list[int]):
        ids = torch.as_tensor(allowed_token_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("AllowedTokensLogitsProcessor needs at least one allowed token id")
        self.allowed_token_ids = ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: [B, V]
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        keep[self.allowed_token_ids.to(scores.device)] = True
        return scores.masked_fill(~keep, float("-inf"))


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
    allowed_token_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the response tokens of a batch, in one forward pass.

    Shapes: input_ids, attention_mask, response_mask [B, T]
        -> (logprobs [B, T] float32, logits [B, T, V]).
    Alignment: `logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`, computed from
    `logits[:, t-1]`; position 0 (BOS, nothing predicts it) is 0, and so is every position where
    `response_mask` is 0. Hence `logprobs.sum(-1)` is log p(response | prompt).
    The logits are returned unscaled (before temperature and restriction), e.g. for entropies.
    Gradients flow through the model; wrap the call in `torch.no_grad()` for a frozen reference.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
    return aligned_logprobs(
        logits, input_ids, response_mask, temperature, allowed_token_ids
    ), logits


def aligned_logprobs(
    logits: Tensor,
    input_ids: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
    allowed_token_ids: Tensor | None = None,
) -> Tensor:
    """`logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])` from `logits[:, t-1]`, [B, T].

    Position 0 and every position where `response_mask` is 0 are 0, so `.sum(-1)` is
    log p(response | prompt). Shared by every forward pass that scores responses.
    """
    shifted = token_logprobs(
        logits[:, :-1], input_ids[:, 1:], temperature, allowed_token_ids
    )  # [B, T-1]
    logprobs = torch.cat([torch.zeros_like(shifted[:, :1]), shifted], dim=1)  # [B, T]
    # `where`, not a product: a masked-out −inf (prompt token outside the allowed ids) must become 0.
    return torch.where(response_mask.bool(), logprobs, torch.zeros_like(logprobs))
