"""Logits processors for `generate`: restriction of sampling to a set of allowed token ids."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LogitsProcessor


class AllowedTokensLogitsProcessor(LogitsProcessor):
    """Sets every score outside `allowed_token_ids` to −inf, so `generate()` samples only those ids.

    Use as `model.generate(..., logits_processor=[AllowedTokensLogitsProcessor(ids)])`. The
    sampled distribution is then the renormalised one that
    `models.logprobs.token_logprobs(..., allowed_token_ids=ids)` scores.
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
