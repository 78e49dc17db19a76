"""Prefill once per group: the k samples of a prompt share it, so its cache is computed once."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.models.heads import head_model, position_ids
from rlhf_lightning.models.shared_prefix import cache_kwarg, cache_of, can_share


@torch.no_grad()
def prefill_once(model, prompt_ids: Tensor, prompt_mask: Tensor, k: int) -> dict:
    """{"cache": the KV cache of prompt[:, :-1] run once per group of k rows and expanded}, for
    `generate` (which then runs only the last prompt token of each row), or {} where the model's
    shared-prefix probe fails (`shared_prefix.can_share`) or there is nothing to share."""
    hf, context = head_model(model)
    if hf is None or k < 2 or prompt_ids.shape[1] < 2:
        return {}
    with context:
        if not can_share(hf, prompt_ids, (k, prompt_ids.shape[1] - 1)):
            return {}
        head, mask = prompt_ids[::k, :-1], prompt_mask[::k, :-1]
        backbone = hf.base_model
        out = backbone(
            input_ids=head, attention_mask=mask, position_ids=position_ids(mask), use_cache=True
        )
    cache = cache_of(out)
    cache.batch_repeat_interleave(k)
    return {cache_kwarg(backbone): cache}
