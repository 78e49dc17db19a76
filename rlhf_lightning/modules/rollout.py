"""Rollouts: what the policy step holds of one batch of samples, and its minibatch shuffles.

Layout (drawn by `generation.sampling.sample`): prompts are left-padded, responses right-padded
after them, so a sequence row is `[pad… bos prompt | response… eos pad…]`, [B, Tp + Tr], and rows
g·k … g·k+k−1 are the k samples of prompt g. Sampling lives in `rlhf_lightning/generation/`,
log-prob maths in `models/logprobs.py`; this module holds the `Rollout` the algorithms read.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from rlhf_lightning.distributed import rank_offset
from rlhf_lightning.generation.keyed import stream_seed

MINIBATCH_STREAM = 2**33  # the key of minibatch shuffles, apart from every prompt index


@dataclass
class Rollout:
    """One batch of sampled responses and everything computed from them (all detached)."""

    prompts: list[str]  # [B] prompt text (repeated k times, grouped)
    responses: list[str]  # [B] decoded response text (without EOS)
    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    response_mask: Tensor  # [B, T] float, 1 on response tokens incl. EOS
    logprobs: Tensor | None  # [B, T] log p_old at sampling time (0 outside the response)
    ref_logprobs: Tensor  # [B, T] log p_ref
    scores: Tensor  # [B] reward (incl. the no-EOS penalty)
    ended: Tensor  # [B] bool: the response closed with EOS
    entropy: Tensor | None  # [B, T] per-token entropy of p_old (None: left to the update)
    values: Tensor | None = None  # [B, T] value estimates (PPO)
    prompt_width: int = 0  # Tp: response tokens start at column Tp
    group_size: int = 1  # rows g·k … g·k+k−1 share their prompt columns [:Tp] (1: no claim)

    def columns(self, cols: slice) -> Rollout:
        """Columns `cols` of every [B, T] tensor (e.g. padding trimmed off a micro-batch)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                value[:, cols] if isinstance(value, Tensor) and value.dim() == 2 else value
            )
        out["prompt_width"] = max(0, self.prompt_width - (cols.start or 0))
        return Rollout(**out)

    def select(self, idx: Tensor, group_size: int = 1) -> Rollout:
        """The rows `idx` (a minibatch); `group_size`: the groups `idx` keeps whole, in order."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value[idx]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in idx.tolist()]
            else:
                out[f.name] = value
        out["group_size"] = group_size
        return Rollout(**out)


def minibatch_rows(n: int, minibatches: int, key: tuple[int, ...], device=None) -> list[Tensor]:
    """This rank's rows (of its n) in each minibatch: a shuffle of the GLOBAL batch keyed by `key`
    (seed, rollout, epoch), cut into `minibatches` chunks, of which every rank keeps its own rows —
    the minibatches one process would cut, whatever the global RNG did (`trainer=ddp`, resume)."""
    if minibatches == 1:  # no order, no random draw
        return [torch.arange(n, device=device)]
    offset, total = rank_offset(n, device)
    generator = torch.Generator().manual_seed(stream_seed(*key[:2], MINIBATCH_STREAM, *key[2:]))
    chunks = torch.randperm(total, generator=generator).to(device).chunk(minibatches)
    return [c[(c >= offset) & (c < offset + n)] - offset for c in chunks]
