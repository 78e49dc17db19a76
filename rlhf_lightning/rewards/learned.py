"""The learned reward model, frozen, normalised with the validation statistics saved beside it.

    r(u, y) = (r_φ(u, y) − μ_val) / σ_val

so that β means the same across reward models (Ziegler et al. 2019 normalise the same way).

A policy sample reaches the reward model as text (`decode_responses`) and is encoded here as the
RM stage encoded its training pairs (`data/encoding.encode_sequences`, same truncation), so the
RM scores a sample with the ids it saw for the same text in training. A reward model of another
family (another vocabulary) re-tokenises that text with its own tokenizer; the policy's own stop
token text at the end of a response (`<|im_end|>`) is dropped first, and the RM's EOS closes it.
A response the policy cut at `max_new_tokens` (`ended` False) is scored without an EOS: the RM
reads it as unfinished, not as a finished response. An RM trained only on EOS-closed texts (the
RM stage appends EOS to every response, as TRL's RewardTrainer does) has never seen such an input,
so its score there is not a judgement: measured on the chat RM (SmolLM2, 96 validation responses
cut at 60 % of their tokens, normalised scale), cut without EOS 0.255 on average, the same cut
texts with EOS −0.979, the whole texts with EOS 0.103 — a cut response out-scores its EOS-closed
twin 97 % of the time. `policy.missing_eos_penalty` (default 1.0) is what keeps cutting from paying.

Length: the RM scores at the `max_length` it was trained at, read from its artifact's manifest
(`stages/rm.py` records `rm.max_length`). `reward.max_length` is read only for artifacts written
before the manifest held it; an explicit value that differs from the manifest's is overruled,
said in one line. A prompt + response longer than that is cut by the shared rule (prompt from
the left first), which makes the RM score a shorter context than the policy saw: said in one line
(once per reward), with how to avoid it (`policy.generation.max_prompt_length`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

from rlhf_lightning.artifacts import content_hash, read_manifest, require_artifact
from rlhf_lightning.data.batching import pad, response_mask
from rlhf_lightning.data.encoding import encode_sequences, stop_token_ids
from rlhf_lightning.models.reward_scores import reward_scores
from rlhf_lightning.rewards.base import RewardContext, RewardFunction

FALLBACK_MAX_LENGTH = 256  # for RM artifacts whose manifest predates `max_length`


class LearnedReward(RewardFunction):
    """path: RM artifact folder (default: the run's `artifacts/<task>/rm`). normalise: use saved stats."""

    name = "learned"
    reads_ended = True
    reads_groups = True

    def __init__(
        self,
        path: str | None = None,
        normalise: bool = True,
        max_length: int | None = None,
        batch_size: int = 64,
        shared_prefix: bool = True,
    ):
        self.path, self.normalise = path, normalise
        self.requested_max_length = max_length  # None: the artifact's (module docstring)
        self.max_length, self.batch_size = max_length or FALLBACK_MAX_LENGTH, batch_size
        self.said_cut = False
        self.shared_prefix = shared_prefix
        self.model = self.tokenizer = None
        self.mean, self.std = 0.0, 1.0
        self.sha256: str | None = None
        self.foreign_stops: tuple[str, ...] = ()  # the policy's stop texts, for a foreign RM

    def setup(self, ctx: RewardContext) -> LearnedReward:
        from transformers import AutoTokenizer

        path = Path(self.path) if self.path else ctx.artifact("rm")
        require_artifact(path, "reward-model", "python train.py stage=rm")
        self.model = ctx.model_spec.reward_model(None, path=path).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        manifest = read_manifest(path)
        self.max_length = scoring_length(
            manifest.get("max_length"), self.requested_max_length, path
        )
        stats = manifest.get("reward_stats") or {}
        if self.normalise and stats:
            self.mean, self.std = float(stats["mean"]), max(float(stats["std"]), 1e-6)
        self.sha256 = content_hash(path)
        self.foreign_stops = _foreign_stop_texts(ctx.tokenizer, self.tokenizer)
        return self

    def to(self, device) -> LearnedReward:
        self.model.to(device)
        return self

    def encode(
        self, prompts: Sequence[str], responses: Sequence[str], ended=None
    ) -> list[list[int]]:
        """The ids the reward model scores for each (prompt, response): those the RM stage
        trained on for the same texts (`encode_sequences`); no EOS where `ended` is False."""
        return [p + r for p, r in self._encode_pairs(prompts, responses, ended)]

    def _encode_pairs(self, prompts, responses, ended=None) -> list[tuple[list[int], list[int]]]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        responses = [_strip_suffix(r, self.foreign_stops) for r in responses]
        ended = None if ended is None else [bool(e) for e in ended]
        return encode_sequences(
            *(self.tokenizer, list(prompts), responses, self.max_length, ended), self._say_cut
        )

    def _say_cut(self, length: int) -> None:
        if not self.said_cut:
            self.said_cut = True
            rank_zero_warn(
                f"[reward] a prompt + response of {length} tokens is longer than the reward "
                f"model's max_length={self.max_length}: it scores it with the prompt cut from the "
                "left (a shorter context than the policy saw); set "
                f"policy.generation.max_prompt_length <= {self.max_length} - max_new_tokens, or "
                "train the reward model with a larger rm.max_length"
            )

    @torch.inference_mode()
    def raw(
        self, prompts: Sequence[str], responses: Sequence[str], ended=None, group_size: int = 1
    ) -> torch.Tensor:
        """Unnormalised RM scores [B]. `group_size` k > 1: the prompts come in runs of k equal
        ones (a rollout's k samples per prompt), and each prompt runs once per run
        (`reward_scores` groups)."""
        device = next(self.model.parameters()).device
        pairs = self._encode_pairs(prompts, responses, ended)  # one batched tokenizer call each
        k = group_size if self.shared_prefix and len(pairs) % group_size == 0 else 1
        size = max(k, self.batch_size - self.batch_size % k)  # chunks of whole groups
        scores = []
        for start in range(0, len(pairs), size):
            chunk = pairs[start : start + size]
            ids, mask = pad([p + r for p, r in chunk], self.tokenizer.pad_token_id)
            groups = response = None
            if k > 1:
                response = response_mask(mask, [len(p) for p, _ in chunk])
                groups = torch.arange(len(chunk)).view(-1, k).to(device)
                response = response.to(device)
            scores.append(
                reward_scores(self.model, ids.to(device), mask.to(device), response, groups)
            )
        return torch.cat(scores).cpu()

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], ended=None, group_size: int = 1
    ) -> torch.Tensor:
        """Normalised scores [B]; `ended` [B] bool: False where a response was cut at
        `max_new_tokens` (scored without an EOS); None: every response ended. `group_size`:
        as `raw`."""
        return (self.raw(prompts, responses, ended, group_size) - self.mean) / self.std


def scoring_length(trained: int | None, requested: int | None, path) -> int:
    """The max_length a reward model scores at: the one it was trained at (its manifest), else
    the one asked for, else `FALLBACK_MAX_LENGTH`; an asked-for value that differs from the
    trained one is overruled, said in one line."""
    if trained is None:
        return requested or FALLBACK_MAX_LENGTH
    if requested is not None and requested != trained:
        rank_zero_warn(
            f"[reward] max_length={requested} ignored: the reward model at '{path}' was trained "
            f"at max_length={trained} (its manifest) and scores at that length; drop "
            "reward.max_length (null) to silence this"
        )
    return int(trained)


def _foreign_stop_texts(policy_tokenizer, rm_tokenizer) -> tuple[str, ...]:
    """The policy tokenizer's stop tokens as text, when the RM's tokenizer is another one (none
    when both have the same vocabulary: then the stop token is the RM's own end)."""
    if policy_tokenizer is None or policy_tokenizer.get_vocab() == rm_tokenizer.get_vocab():
        return ()
    tokens = policy_tokenizer.convert_ids_to_tokens(stop_token_ids(policy_tokenizer))
    return tuple(t for t in tokens if t)


def _strip_suffix(text: str, suffixes: tuple[str, ...]) -> str:
    for suffix in suffixes:
        if text.endswith(suffix):
            return text[: -len(suffix)]
    return text
