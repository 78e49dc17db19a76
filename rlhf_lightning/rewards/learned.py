"""The learned reward model, frozen, normalised with the validation statistics saved beside it.

    r(u, y) = (r_φ(u, y) − μ_val) / σ_val

so that β means the same across reward models (Ziegler et al. 2019 normalise the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf_lightning.artifacts import content_hash, read_manifest, require_artifact
from rlhf_lightning.data.batching import pad, truncate
from rlhf_lightning.data.encoding import encode_prompts, encode_responses
from rlhf_lightning.rewards.base import RewardFunction


class LearnedReward(RewardFunction):
    """path: RM artifact folder (default: the run's `artifacts/<task>/rm`). normalise: use saved stats."""

    name = "learned"

    def __init__(
        self,
        path: str | None = None,
        normalise: bool = True,
        max_length: int = 256,
        batch_size: int = 64,
    ):
        self.path, self.normalise = path, normalise
        self.max_length, self.batch_size = max_length, batch_size
        self.model = self.tokenizer = None
        self.mean, self.std = 0.0, 1.0
        self.sha256: str | None = None

    def setup(self, ctx) -> LearnedReward:
        from transformers import AutoTokenizer

        path = Path(self.path) if self.path else ctx.artifact("rm")
        require_artifact(path, "reward-model", "python train.py stage=rm")
        self.model = ctx.model_spec.reward_model(None, path=path).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        stats = read_manifest(path).get("reward_stats", {})
        if self.normalise and stats:
            self.mean, self.std = float(stats["mean"]), max(float(stats["std"]), 1e-6)
        self.sha256 = content_hash(path)
        return self

    def to(self, device) -> LearnedReward:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def raw(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Unnormalised RM scores [B]."""
        device = next(self.model.parameters()).device
        eos = self.tokenizer.eos_token_id
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        seqs = []  # one batched tokenizer call each for prompts and responses
        encoded = zip(
            encode_prompts(self.tokenizer, list(prompts)),
            encode_responses(self.tokenizer, list(responses)),
            strict=True,
        )
        for p, r in encoded:
            p, r = truncate(p, r, self.max_length, eos)
            seqs.append(p + r)
        scores = []
        for start in range(0, len(seqs), self.batch_size):
            ids, mask = pad(seqs[start : start + self.batch_size], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores.append(logits[:, 0].float())
        return torch.cat(scores).cpu()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return (self.raw(prompts, responses) - self.mean) / self.std
