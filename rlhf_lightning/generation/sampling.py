"""Sampling: prompts in, sequences laid out for every pass out.

Layout: prompts are left-padded, responses right-padded after them, so a sequence row is
`[pad… bos prompt | response… eos pad…]`, [B, Tp + Tr]. `response_mask` is 1 on response tokens
up to and including the first EOS (explicit, no pad-token guessing). Position ids are computed
from the attention mask, exactly as `generate` does, so scored log-probs equal sampled ones.
Samples are grouped: rows g·k … g·k+k−1 are the k samples of prompt g.

Samples come from our settings only: softmax(z/T), restricted to `allowed_token_ids`, with keyed
Gumbel noise (`keyed`), drawn by the settings' `RolloutBackend` (`backend`).
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from rlhf_lightning.data.encoding import encode_prompts, fit_prompts, stop_token_ids
from rlhf_lightning.generation.backend import RolloutBackend
from rlhf_lightning.generation.settings import GenerationSettings


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
    backend: RolloutBackend | None = None,
):
    """Draw `group_size` responses per prompt with KV-cached batched generation.

    Returns (input_ids [B, T], attention_mask [B, T], response_mask [B, T], ended [B], Tp) where
    B = len(prompts)·group_size, Tp is the (left-padded) prompt width, and response tokens after
    the first EOS are masked and padded. With `seeds` ([B], see `keyed.sample_seeds`) each sample
    draws from its own random stream (`keyed.KeyedGumbelSampling`); without, from the global RNG.
    `batch_size`: sequences per backend call (None: all at once); every chunk is laid out at
    the same prompt width, so keyed samples do not depend on it. `shared_prefix`: each distinct
    prompt is prefilled once (`prefill_once`; `batch_size` must then hold whole groups).
    `backend`: who draws (None: `settings.backend`); keyed samples are the same from every one.
    """
    if seeds is not None and len(seeds) != len(prompts) * group_size:
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts × {group_size} samples")
    backend = backend or settings.backend
    device = next(policy.parameters()).device
    prompt_ids, prompt_mask = left_padded(tokenizer, prompts, group_size, device)  # [B, Tp]
    pad_id = tokenizer.pad_token_id
    stops = stop_token_ids(tokenizer, getattr(policy, "generation_config", None))
    was_training = policy.training
    policy.eval()
    pieces = []
    for rows in torch.arange(len(prompt_ids)).split(batch_size or len(prompt_ids)):
        chunk_seeds = None if seeds is None else [seeds[i] for i in rows.tolist()]
        out = backend.generate(
            *(policy, prompt_ids[rows], prompt_mask[rows], settings, chunk_seeds, stops, pad_id),
            group_size=group_size if shared_prefix else 1,
        )
        pieces.append(out.ids)  # [b, Tr_chunk]
    policy.train(was_training)
    longest = max(p.shape[1] for p in pieces)
    response = torch.cat(
        [torch.nn.functional.pad(p, (0, longest - p.shape[1]), value=pad_id) for p in pieces]
    )  # [B, Tr]
    response, response_mask, ended = cut_after_stop(response, stops, pad_id)
    input_ids = torch.cat([prompt_ids, response], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    full_response_mask = torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1)
    return input_ids, attention_mask, full_response_mask, ended, prompt_ids.shape[1]


def left_padded(tokenizer, prompts: list[str], group_size: int, device) -> tuple[Tensor, Tensor]:
    """Prompt ids and attention mask [B, Tp], left-padded to the longest prompt, each prompt
    repeated `group_size` times in a row (B = len(prompts)·k, grouped)."""
    encoded = encode_prompts(tokenizer, list(prompts))
    width = max(len(e) for e in encoded)
    prompt_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i, ids in enumerate(encoded):  # left padding
        prompt_ids[i, width - len(ids) :] = torch.tensor(ids)
        prompt_mask[i, width - len(ids) :] = 1
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0).to(device)  # [B, Tp], grouped
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0).to(device)
    return prompt_ids, prompt_mask


def cut_after_stop(response: Tensor, stops: list[int], pad_id: int):
    """(response [B, Tr] padded strictly after its first stop id, response mask [B, Tr] long —
    1 up to and including that stop —, ended [B] bool: the row holds a stop id)."""
    is_eos = torch.isin(response, torch.tensor(stops, device=response.device))  # any stop id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return response.masked_fill(after_eos, pad_id), (~after_eos).long(), is_eos.any(-1)


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
