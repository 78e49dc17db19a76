"""Rollouts: sample responses from the policy and compute what every algorithm needs from them.

Layout: prompts are left-padded, responses right-padded after them, so a sequence row is
`[pad… bos prompt | response… eos pad…]`, [B, Tp + Tr]. `response_mask` is 1 on response tokens
up to and including the first EOS (explicit, no pad-token guessing). Position ids are computed
from the attention mask, exactly as `generate` does, so scored log-probs equal sampled ones.
Samples are grouped: rows g·k … g·k+k−1 are the k samples of prompt g.

Samples come from our settings only: softmax(z/T), restricted to `allowed_token_ids`, with keyed
Gumbel noise. A checkpoint's `generation_config.json` may set repetition_penalty, top_k, top_p,
min_p, suppress_tokens, no_repeat_ngram_size, … which would make samples come from another
distribution than the one the log-probs score; from it we take only the stop ids
(`encoding.stop_token_ids`). `generate` in transformers 5 fills every field of the config it is
given that is None from `model.generation_config` (`_prepare_generation_config`), and many fields
(min_p, suppress_tokens, forced_eos_token_id, stop_strings, …) have no neutral non-None value, so
`_generate` passes a complete config of ours (`own_generation_config`) AND blanks the model's for
the call (`checkpoint_defaults_off`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from transformers import GenerationConfig

from rlhf_lightning.data.encoding import encode_prompts, fit_prompts, stop_token_ids
from rlhf_lightning.distributed import rank_offset
from rlhf_lightning.models.logprobs import (
    AllowedTokensLogitsProcessor,
    ResponseScores,
    _cache_kwarg,
    _cache_of,
    _can_share,
    head_model,
    position_ids,
    response_logprobs,
)

MINIBATCH_STREAM = 2**33  # the key of minibatch shuffles, apart from every prompt index


@dataclass
class GenerationSettings:
    """Sampling settings, recorded with the run; log-probs use the same temperature.

    max_new_tokens: response length limit. min_new_tokens: fixed-length tasks set both.
    allowed_token_ids: restrict sampling (and scoring) to these ids (enumerable tasks).
    max_prompt_length: prompt tokens the policy conditions on (None: all); a longer prompt is cut
    from the left by the truncation rule of the RM (`encoding.fit_prompts`), and the reward scores
    the cut text, so both read the same context.
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float = 1.0
    allowed_token_ids: Tensor | None = None
    max_prompt_length: int | None = None


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


def forward_logprobs(
    model,
    input_ids,
    attention_mask,
    response_mask,
    temperature=1.0,
    allowed_token_ids=None,
    entropy: bool = False,
    hidden: bool = False,
    shared_prefix: tuple[int, int] | None = None,
) -> ResponseScores:
    """Per-token log p of the response tokens [B, T] (0 elsewhere), their entropies and the
    backbone's hidden states, with logits at response positions only (`response_logprobs`).

    `logprobs[:, t]` is log p(input_ids[:, t] | input_ids[:, :t]); positions are counted over
    real tokens (`position_ids`), as `generate` counts them. `shared_prefix` (k, Tp): groups of
    k rows share their prompt, which then runs once per group (`response_logprobs`).
    """
    return response_logprobs(
        model,
        input_ids,
        attention_mask,
        response_mask,
        temperature,
        allowed_token_ids,
        position_ids=position_ids(attention_mask),
        entropy=entropy,
        hidden=hidden,
        shared_prefix=shared_prefix,
    )


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


MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for x < 2³², in int64 without overflow (the high half of c is split off)."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' "lowbias32"), elementwise on int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_uniform(seeds: Tensor, step: int, vocab: int) -> Tensor:
    """Uniforms u ∈ (0, 1), [B, V] float32: a counter-based hash of (seed_b, step, token v).

    One vectorised draw for every row and token: u[b, v] depends on seeds[b] (int64 [B]), `step`
    and v only, never on the batch around row b — the guarantee keyed sampling rests on. 23 bits
    per uniform, (k + ½)·2⁻²³, so −log(−log u) is always finite.
    """
    lo, hi = (seeds & MASK32)[:, None], ((seeds >> 32) & MASK32)[:, None]  # [B, 1]
    row = _mix32(hi ^ _mix32(lo ^ _mix32(torch.full_like(lo, step & MASK32))))
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None]  # [1, V]
    h = _mix32(_mix32(token ^ row) ^ lo)  # [B, V]
    return ((h >> 9).float() + 0.5) * 2.0**-23


class KeyedGumbelSampling:
    """A logits processor that turns greedy decoding into sampling with a random stream per row.

    argmax_v (s_v / T + g_v), g_v ~ Gumbel(0, 1) i.i.d., is a draw from softmax(s / T) (the
    Gumbel-max trick). Row b's noise at decoding step t is `keyed_uniform(seeds, t, V)[b]`, a hash
    of (seeds[b], t, v): what a row samples depends on its seed and its own tokens only, and the
    noise of all rows is one vectorised computation per step (no per-row generator).
    """

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.temperature = temperature
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
        self.step = 0

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        u = keyed_uniform(self.seeds, self.step, scores.shape[-1])  # [B, V]
        self.step += 1
        gumbel = -torch.log(-torch.log(u))
        return scores.float() / self.temperature + gumbel


def policy_prompts(tokenizer, prompts: list[str], settings: GenerationSettings) -> list[str]:
    """The prompt texts the policy conditions on and the reward scores: each cut from the left
    to `settings.max_prompt_length` tokens by the RM's truncation rule (`encoding.fit_prompts`);
    that prompts are cut is said in one line."""
    fitted, cut = fit_prompts(tokenizer, list(prompts), settings.max_prompt_length)
    if cut:
        rank_zero_warn(
            f"[policy] prompts longer than max_prompt_length={settings.max_prompt_length} tokens "
            "are cut from the left (the policy samples from and the reward scores the cut text)"
        )
    return fitted


@torch.no_grad()
def sample(
    policy,
    tokenizer,
    prompts: list[str],
    group_size: int,
    settings: GenerationSettings,
    seeds: list[int] | None = None,
    batch_size: int | None = None,
    shared_prefix: bool = False,
):
    """Draw `group_size` responses per prompt with KV-cached batched generation.

    Returns (input_ids [B, T], attention_mask [B, T], response_mask [B, T], ended [B], Tp) where
    B = len(prompts)·group_size, Tp is the (left-padded) prompt width, and response tokens after
    the first EOS are masked and padded. With `seeds` ([B], see `sample_seeds`) each sample draws
    from its own random stream (`KeyedGumbelSampling`); without, from the global RNG.
    `batch_size`: sequences per `generate` call (None: all at once); every chunk is laid out at
    the same prompt width, so keyed samples do not depend on it. `shared_prefix`: each distinct
    prompt is prefilled once (`prefill_once`; `batch_size` must then hold whole groups).
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
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0).to(device)  # [B, Tp], grouped
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0).to(device)
    was_training = policy.training
    policy.eval()
    pieces = []
    for rows in torch.arange(len(prompt_ids)).split(batch_size or len(prompt_ids)):
        chunk_seeds = None if seeds is None else [seeds[i] for i in rows.tolist()]
        out = _generate(
            policy,
            tokenizer,
            *(prompt_ids[rows], prompt_mask[rows], settings, chunk_seeds),
            group_size if shared_prefix else 1,
        )
        pieces.append(out[:, width:])  # [b, Tr_chunk]
    policy.train(was_training)
    longest = max(p.shape[1] for p in pieces)
    response = torch.cat(
        [torch.nn.functional.pad(p, (0, longest - p.shape[1]), value=pad_id) for p in pieces]
    )  # [B, Tr]
    stops = stop_token_ids(tokenizer, getattr(policy, "generation_config", None))
    is_eos = torch.isin(response, torch.tensor(stops, device=response.device))  # any stop id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    response_mask = (~after_eos).long()
    response = response.masked_fill(after_eos, pad_id)
    ended = is_eos.any(-1)
    input_ids = torch.cat([prompt_ids, response], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    full_response_mask = torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1)
    return input_ids, attention_mask, full_response_mask, ended, width


def _generate(policy, tokenizer, prompt_ids, prompt_mask, settings, seeds, group_size=1):
    """One `generate` call: [b, Tp] left-padded prompts -> [b, Tp + Tr] (keyed when seeds).

    group_size k > 1: rows come in groups of k copies of one prompt; the prompt (but its last
    token) is prefilled once per group and its cache expanded to the k rows (`prefill_once`)."""
    processors = []
    if settings.allowed_token_ids is not None:
        processors.append(AllowedTokensLogitsProcessor(settings.allowed_token_ids))
    if seeds is not None:  # greedy over Gumbel-perturbed logits = sampling, one stream per row
        processors.append(KeyedGumbelSampling(seeds, settings.temperature, prompt_ids.device))
    stops = stop_token_ids(tokenizer, getattr(policy, "generation_config", None))
    config = own_generation_config(settings, tokenizer.pad_token_id, stops, seeds is None)
    cache = prefill_once(policy, prompt_ids, prompt_mask, group_size)
    with checkpoint_defaults_off(policy):
        return policy.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=config,
            logits_processor=processors,
            **cache,
        )


def own_generation_config(
    settings: GenerationSettings, pad_id: int | None, stops: list[int], sampled: bool
) -> GenerationConfig:
    """Our settings as a complete `GenerationConfig`: every field transformers has a default for
    at its neutral value (the lengths come from `max_new_tokens`/`min_new_tokens`), and, when
    `generate` samples (`sampled`; keyed sampling is greedy over `KeyedGumbelSampling`'s
    perturbed logits), T = `settings.temperature` with top_k off; the stop ids and the pad id.
    Nothing in it comes from the checkpoint's `generation_config.json`."""
    neutral = GenerationConfig._get_default_generation_params()
    for key in ("max_length", "min_length"):  # `max_new_tokens`/`min_new_tokens` say it
        neutral.pop(key)
    config = GenerationConfig(**neutral)
    sampling = dict(temperature=settings.temperature, top_k=0) if sampled else {}  # HF: top_k 50
    config.update(
        do_sample=sampled,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        eos_token_id=list(stops),
        pad_token_id=pad_id,
        **sampling,
    )
    return config


@contextlib.contextmanager
def checkpoint_defaults_off(policy) -> Iterator[None]:
    """The model `generate` runs on holds a blank `generation_config` while the block runs, so
    `generate` has nothing of the checkpoint's to fill our config's None fields with (restored
    after). Models we only call whole (`head_model` gives None) keep theirs."""
    hf, _ = head_model(policy)
    saved = getattr(hf, "generation_config", None)
    if saved is None:
        yield
        return
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


@torch.no_grad()
def prefill_once(model, prompt_ids: Tensor, prompt_mask: Tensor, k: int) -> dict:
    """{"cache": the KV cache of prompt[:, :-1] run once per group of k rows and expanded}, for
    `generate` (which then runs only the last prompt token of each row), or {} where the model's
    shared-prefix probe fails (`logprobs._can_share`) or there is nothing to share."""
    hf, context = head_model(model)
    if hf is None or k < 2 or prompt_ids.shape[1] < 2:
        return {}
    with context:
        if not _can_share(hf, prompt_ids, (k, prompt_ids.shape[1] - 1)):
            return {}
        head, mask = prompt_ids[::k, :-1], prompt_mask[::k, :-1]
        backbone = hf.base_model
        out = backbone(
            input_ids=head, attention_mask=mask, position_ids=position_ids(mask), use_cache=True
        )
    cache = _cache_of(out)
    cache.batch_repeat_interleave(k)
    return {_cache_kwarg(backbone): cache}


def decode_responses(tokenizer, input_ids: Tensor, response_mask: Tensor) -> list[str]:
    """Response text of each row, padding and special tokens dropped, that `encode_response`
    turns back into the sampled ending: a final EOS is dropped (encoding appends it again), a
    final end of turn that is not EOS (`<|im_end|>` under an `<|endoftext|>` EOS) is kept as text."""
    stops, eos = set(stop_token_ids(tokenizer)), tokenizer.eos_token_id
    texts = []
    for ids, mask in zip(input_ids, response_mask, strict=True):
        tokens = ids[mask.bool()].tolist()
        end = tokens[-1:] if tokens and tokens[-1] in stops and tokens[-1] != eos else []
        text = tokenizer.decode(tokens[: len(tokens) - len(end)], skip_special_tokens=True)
        texts.append(text + tokenizer.decode(end) if end else text)
    return texts


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
