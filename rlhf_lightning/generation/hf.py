"""`HFGenerateBackend`: responses from transformers' `generate`, the default backend.

Keyed sampling is greedy decoding over Gumbel-perturbed logits (`keyed.KeyedGumbelSampling`):
argmax(z/T + g) is a draw from softmax(z/T) with row b's noise a hash of (seed_b, step, token).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.generation.backend import Responses, stop_flags
from rlhf_lightning.generation.checkpoint_config import (
    checkpoint_defaults_off,
    own_generation_config,
)
from rlhf_lightning.generation.keyed import KeyedGumbelSampling
from rlhf_lightning.generation.prefill import prefill_once
from rlhf_lightning.generation.processors import AllowedTokensLogitsProcessor
from rlhf_lightning.generation.settings import GenerationSettings


class HFGenerateBackend:
    """One `generate` call per chunk: [b, Tp] left-padded prompts -> Responses (keyed when seeds).

    group_size k > 1: rows come in groups of k copies of one prompt; the prompt (but its last
    token) is prefilled once per group and its cache expanded to the k rows (`prefill_once`).
    """

    @torch.no_grad()
    def generate(
        self,
        model,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        settings: GenerationSettings,
        seeds: list[int] | None,
        stop_ids: list[int],
        pad_id: int,
        group_size: int = 1,
    ) -> Responses:
        processors = []
        if settings.allowed_token_ids is not None:
            processors.append(AllowedTokensLogitsProcessor(settings.allowed_token_ids))
        if seeds is not None:  # greedy over Gumbel-perturbed logits = sampling, one stream per row
            processors.append(KeyedGumbelSampling(seeds, settings.temperature, prompt_ids.device))
        config = own_generation_config(settings, pad_id, stop_ids, seeds is None)
        cache = prefill_once(model, prompt_ids, prompt_mask, group_size)
        with checkpoint_defaults_off(model):
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=config,
                logits_processor=processors,
                **cache,
            )
        response = out[:, prompt_ids.shape[1] :]  # [b, Tr]
        return Responses(response, stop_flags(response, stop_ids))
