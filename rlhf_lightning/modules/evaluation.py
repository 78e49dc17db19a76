"""Evaluate a policy on held-out prompts: proxy reward, gold reward and KL to the reference.

Shared by the end-of-stage summary and the evaluation callbacks, so every number of the form
`eval/*` is computed one way (the sampling itself is `generation.sampling.sample`, keyed by
`generation.keyed.EVAL_STREAM`): sample from the policy at the training temperature, score the text
with the proxy (the reward being optimised) and, when the task has one, the gold reward; KL is the
k1 estimate Σ_t log p_θ/p_ref over the policy's own samples (unbiased for KL(p_θ‖p_ref)).

What it reads of the module under evaluation is `PolicyUnderEvaluation`: `PolicyModule` and
`DPOModule` serve it, and `eval.py` (no module) fills an `EvaluationSetup`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from rlhf_lightning.generation.keyed import EVAL_STREAM, sample_seeds
from rlhf_lightning.generation.sampling import decode_responses, policy_prompts, sample
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.losses import kl_per_token, sequence_kl
from rlhf_lightning.models.logprobs import forward_logprobs
from rlhf_lightning.rewards.base import score


class PolicyUnderEvaluation(Protocol):
    """What `sample_and_score` reads: how to sample, the tokenizer, the frozen reference (KL is
    against it) and the proxy reward. Optional, read where present: `forward_batch_size`
    (sequences per call) and `shared_prefix` (each prompt once per group of samples; True)."""

    generation: GenerationSettings
    tokenizer: Any
    reference: nn.Module
    reward: Callable


@dataclass
class EvaluationSetup:
    """A `PolicyUnderEvaluation` without a LightningModule (`eval.py mode=policy`)."""

    generation: GenerationSettings
    tokenizer: Any
    reference: nn.Module
    reward: Callable
    forward_batch_size: int | None = None
    shared_prefix: bool = True


@torch.no_grad()
def sample_and_score(
    module: PolicyUnderEvaluation,
    model,
    prompts: list[str],
    samples_per_prompt: int = 1,
    gold: Callable | None = None,
    batch_size: int = 64,
    seeds: list[int] | None = None,
) -> dict:
    """Responses of `model` to `prompts`, with per-sample proxy, gold, KL (k1 and k3), length
    and `ended` (closed by a stop token) tensors [B]; k > 1 samples of a prompt share its prefix.

    `seeds` (one per sample, see `keyed.sample_seeds`) key each sample's random draws; without
    them sampling uses the global RNG. `module.forward_batch_size`, when set, bounds the
    sequences per call instead of `batch_size`. Prompts longer than the generation settings'
    `max_prompt_length` are cut as training cuts them (`policy_prompts`); the returned prompts
    are the texts sampled from and scored, and a response cut at `max_new_tokens` is scored
    without an EOS (`rewards.base.score` hands `ended` on)."""
    gen = module.generation
    batch_size = getattr(module, "forward_batch_size", None) or batch_size
    out: dict[str, list] = {
        "prompts": [],
        "responses": [],
        "proxy": [],
        "gold": [],
        "kl": [],
        "kl_k3": [],
        "length": [],
        "ended": [],
    }
    prompts = policy_prompts(module.tokenizer, prompts, gen)
    shared = getattr(module, "shared_prefix", True) and samples_per_prompt > 1
    per_call = max(1, batch_size // samples_per_prompt)
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start : start + per_call]
        k = samples_per_prompt
        chunk_seeds = None if seeds is None else seeds[start * k : (start + len(chunk)) * k]
        ids, attn, mask, ended, width = sample(
            model, module.tokenizer, chunk, k, gen, chunk_seeds, shared_prefix=shared
        )
        prefix = (k, width) if shared else None  # the k samples of a prompt share it
        logp, _, _ = forward_logprobs(
            model, ids, attn, mask, gen.temperature, gen.allowed_token_ids, shared_prefix=prefix
        )
        ref, _, _ = forward_logprobs(
            *(module.reference, ids, attn, mask, gen.temperature, gen.allowed_token_ids),
            shared_prefix=prefix,
        )
        chunk_k = [p for p in chunk for _ in range(samples_per_prompt)]
        responses = decode_responses(module.tokenizer, ids, mask)
        out["prompts"] += chunk_k
        out["responses"] += responses
        proxy = score(module.reward, chunk_k, responses, ended, group_size=k)
        out["proxy"].append(proxy.float().cpu())
        if gold is not None:
            out["gold"].append(torch.as_tensor(gold(chunk_k, responses), dtype=torch.float32))
        out["kl"].append(sequence_kl(kl_per_token(logp, ref, "k1"), mask).cpu())
        out["kl_k3"].append(sequence_kl(kl_per_token(logp, ref, "k3"), mask).cpu())
        out["length"].append(mask.sum(-1).float().cpu())
        out["ended"].append(ended.cpu())
    for key in ("proxy", "gold", "kl", "kl_k3", "length", "ended"):
        out[key] = torch.cat(out[key]) if out[key] else None
    return out


def evaluate_policy(
    module, prompts: list[str], gold: Callable | None, n_samples: int, seed: int = 0
) -> dict:
    """Final numbers of the policy stage: policy vs its reference (SFT or checkpoint), held-out prompts.

    Sample i of both models draws from the same random stream, keyed by (seed, i): the numbers do
    not depend on training's RNG, and the policy–reference difference has less noise.
    """
    prompts = (prompts * (n_samples // max(len(prompts), 1) + 1))[:n_samples]
    seeds = sample_seeds(seed, EVAL_STREAM, range(len(prompts)), 1)
    was_training = module.policy.training
    after = sample_and_score(module, module.policy, prompts, gold=gold, seeds=seeds)
    before = sample_and_score(module, module.reference, prompts, gold=gold, seeds=seeds)
    module.policy.train(was_training)
    result = {
        "proxy_reward": float(after["proxy"].mean()),
        "kl": float(after["kl"].mean()),
        "reference_proxy_reward": float(before["proxy"].mean()),
    }
    if after["gold"] is not None:
        result["gold_reward"] = float(after["gold"].mean())
        result["reference_gold_reward"] = float(before["gold"].mean())
    return result
