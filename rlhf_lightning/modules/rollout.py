"""Rollouts: sample responses from the policy and compute what every algorithm needs from them.

Layout: prompts are left-padded, responses right-padded after them, so a sequence row is
`[pad… bos prompt | response… eos pad…]`, [B, Tp + Tr]. `response_mask` is 1 on response tokens
up to and including the first EOS (explicit, no pad-token guessing). Position ids are computed
from the attention mask, exactly as `generate` does, so scored log-probs equal sampled ones.
Samples are grouped: rows g·k … g·k+k−1 are the k samples of prompt g.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from rlhf_lightning.data.encoding import encode_prompts
from rlhf_lightning.distributed import rank_offset
from rlhf_lightning.models.logprobs import (
    AllowedTokensLogitsProcessor,
    aligned_logprobs,
    entropy_from_logits,
)

MINIBATCH_STREAM = 2**33  # the key of minibatch shuffles, apart from every prompt index


@dataclass
class GenerationSettings:
    """Sampling settings, recorded with the run; log-probs use the same temperature.

    max_new_tokens: response length limit. min_new_tokens: fixed-length tasks set both.
    allowed_token_ids: restrict sampling (and scoring) to these ids (enumerable tasks).
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float = 1.0
    allowed_token_ids: Tensor | None = None


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

    def select(self, idx: Tensor) -> Rollout:
        """The rows `idx` (a minibatch)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value[idx]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in idx.tolist()]
            else:
                out[f.name] = value
        return Rollout(**out)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only (left padding gets 0), as `generate` uses."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def forward_logprobs(
    model,
    input_ids,
    attention_mask,
    response_mask,
    temperature=1.0,
    allowed_token_ids=None,
    hidden: bool = False,
):
    """Per-token log p of the response tokens [B, T] (0 elsewhere), the logits, and hidden states.

    `logprobs[:, t]` is log p(input_ids[:, t] | input_ids[:, :t]) from `logits[:, t-1]`.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        output_hidden_states=hidden,
    )
    logprobs = aligned_logprobs(
        out.logits, input_ids, response_mask, temperature, allowed_token_ids
    )
    return logprobs, out.logits, (out.hidden_states[-1] if hidden else None)


def stream_seed(*key: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hash): one random stream per key."""
    import numpy as np

    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


def sample_seeds(seed: int, rollout: int, keys: Tensor | list[int], group_size: int) -> list[int]:
    """One seed per sample [len(keys)·k]: a hash of (run seed, rollout number, key, j < k).

    Keys identify prompts (their index in the prompt set), so a sample's random draws do not depend
    on the batch it is drawn in, nor on the rank that draws it (`trainer=ddp`).
    """
    keys = keys.tolist() if isinstance(keys, Tensor) else list(keys)
    return [stream_seed(seed, rollout, key, j) for key in keys for j in range(group_size)]


class KeyedGumbelSampling:
    """A logits processor that turns greedy decoding into sampling with a random stream per row.

    argmax_v (s_v / T + g_v), g_v ~ Gumbel(0, 1) i.i.d., is a draw from softmax(s / T) (the
    Gumbel-max trick). Row b's noise comes from its own generator seeded with `seeds[b]`, and every
    row draws once per decoding step, so what a row samples depends on its seed and its own tokens
    only. Costs one `torch.rand(V)` per row and step.
    """

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        vocab, device = scores.shape[-1], scores.device
        u = torch.stack([torch.rand(vocab, generator=g, device=device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))  # [B, V]
        return scores.float() / self.temperature + gumbel


@torch.no_grad()
def sample(
    policy,
    tokenizer,
    prompts: list[str],
    group_size: int,
    settings: GenerationSettings,
    seeds: list[int] | None = None,
):
    """Draw `group_size` responses per prompt with KV-cached batched generation.

    Returns (input_ids [B, T], attention_mask [B, T], response_mask [B, T], ended [B], Tp) where
    B = len(prompts)·group_size, Tp is the (left-padded) prompt width, and response tokens after
    the first EOS are masked and padded. With `seeds` ([B], see `sample_seeds`) each sample draws
    from its own random stream (`KeyedGumbelSampling`); without, from the global RNG.
    """
    if seeds is not None and len(seeds) != len(prompts) * group_size:
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts × {group_size} samples")
    device = next(policy.parameters()).device
    encoded = encode_prompts(tokenizer, list(prompts))
    width = max(len(e) for e in encoded)
    pad_id = tokenizer.pad_token_id
    prompt_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i, ids in enumerate(encoded):  # left padding
        prompt_ids[i, width - len(ids) :] = torch.tensor(ids)
        prompt_mask[i, width - len(ids) :] = 1
    processors = []
    if settings.allowed_token_ids is not None:
        processors.append(AllowedTokensLogitsProcessor(settings.allowed_token_ids))
    if seeds is not None:  # greedy over Gumbel-perturbed logits = sampling, one stream per row
        processors.append(KeyedGumbelSampling(seeds, settings.temperature, device))
        how = dict(do_sample=False)
    else:
        how = dict(do_sample=True, temperature=settings.temperature, top_k=0, top_p=1.0)
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0).to(device)  # [B, Tp], grouped
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0).to(device)
    was_training = policy.training
    policy.eval()
    out = policy.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        logits_processor=processors,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        **how,
    )
    policy.train(was_training)
    response = out[:, width:]  # [B, Tr]
    is_eos = response == tokenizer.eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    response_mask = (~after_eos).long()
    response = response.masked_fill(after_eos, pad_id)
    ended = is_eos.any(-1)
    input_ids = torch.cat([out[:, :width], response], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    full_response_mask = torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1)
    return input_ids, attention_mask, full_response_mask, ended, width


def decode_responses(tokenizer, input_ids: Tensor, response_mask: Tensor) -> list[str]:
    """Response text of each row (EOS and padding dropped)."""
    texts = []
    for ids, mask in zip(input_ids, response_mask, strict=True):
        tokens = ids[mask.bool()].tolist()
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts


def response_entropy(logits: Tensor, mask: Tensor, settings: GenerationSettings) -> Tensor:
    """Entropy [B, T] (nats) of the sampling distribution at each response token, from logits
    [B, T, V] aligned like `aligned_logprobs` (position t from logits t−1); 0 off the response."""
    h = entropy_from_logits(logits[:, :-1], settings.temperature, settings.allowed_token_ids)
    return torch.cat([torch.zeros_like(h[:, :1]), h], 1) * mask


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
