"""Sampling settings, recorded with the run: what is sampled, and the backend that draws it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class GenerationSettings:
    """Sampling settings, recorded with the run; log-probs use the same temperature.

    max_new_tokens: response length limit. min_new_tokens: fixed-length tasks set both.
    allowed_token_ids: restrict sampling (and scoring) to these ids (enumerable tasks).
    max_prompt_length: prompt tokens the policy conditions on (None: all); a longer prompt is cut
    from the left by the truncation rule of the RM (`encoding.fit_prompts`), and the reward scores
    the cut text, so both read the same context.
    backend: the `RolloutBackend` that draws the samples, or its config node (`_target_`);
    None: `HFGenerateBackend` (transformers' `generate`). Every backend draws the same keyed
    samples; only the time differs.
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float = 1.0
    allowed_token_ids: Tensor | None = None
    max_prompt_length: int | None = None
    backend: Any = None

    def __post_init__(self):
        if self.backend is None:
            from rlhf_lightning.generation.hf import HFGenerateBackend

            self.backend = HFGenerateBackend()
        elif not callable(getattr(self.backend, "generate", None)):  # a config node
            from hydra.utils import instantiate

            self.backend = instantiate(self.backend)
