"""The rollout-backend seam: how responses are drawn, apart from what is drawn.

A backend takes left-padded prompt ids and keys and gives back response ids and stop flags; the
layout around it (encoding, padding, masks after the first stop, decoding) is `sampling.sample`'s
and the log-probs come from the trainer's own pass, so a backend changes time, never numbers.
Backends: `hf.HFGenerateBackend` (transformers' `generate`, the default), `loop.DecodeLoopBackend`
(a plain decode loop: noise only where a token can win, finished rows dropped); a vLLM backend for
GPUs would be a third. Chosen by `policy.generation.backend` (a `_target_` node).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from rlhf_lightning.generation.settings import GenerationSettings


class Responses(NamedTuple):
    """What a backend returns: response ids [B, Tr] (pad after a row's first stop id; Tr the
    longest response, ≤ max_new_tokens) and stop flags [B] bool (the row ended with a stop id)."""

    ids: Tensor
    ended: Tensor


@runtime_checkable
class RolloutBackend(Protocol):
    """Draws responses to left-padded prompts.

    prompt_ids, prompt_mask: [B, Tp] (left-padded); seeds: [B] stream seeds (`keyed.sample_seeds`)
    or None (the global RNG); stop_ids: the ids that end a response; group_size k > 1: rows come in
    groups of k copies of one prompt (the prompt may be prefilled once per group). Keyed samples
    must equal `HFGenerateBackend`'s token for token (the Gumbel-max draw of `keyed`).
    """

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
    ) -> Responses: ...


def stop_flags(response: Tensor, stop_ids: list[int]) -> Tensor:
    """[B] bool: the row holds a stop id (it ended), from response ids [B, Tr]."""
    return torch.isin(response, torch.tensor(stop_ids, device=response.device)).any(-1)
