"""Shared prefixes: the k samples of a prompt share its tokens, so the prompt runs once per group.

`shared_prefix_states` runs the prompt [G, Tp] once with a KV cache, expands the cache to the
B = G·k rows and runs the responses against it, positions continuing the prompt's; the backbone
states equal the plain pass's (checked once per model in float64 by `shared_prefix_is_exact`).
`can_share` decides per call; where the path cannot be taken (activation checkpointing under
grad, a model whose cache cannot be reused) it says so once (`fall_back`) and the plain pass runs.
`regroup` lays right-padded rows that share a prompt (a preference pair, for the reward model and
DPO) out as [left-padded prompt | right-padded responses], the layout `shared_prefix_states` takes.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from rlhf_lightning.models.heads import agree, checkpointing, position_ids, probing


def shared_prefix_states(hf, input_ids: Tensor, attention_mask: Tensor, k: int, width: int):
    """Backbone states [B, T − Tp + 1, H] at columns Tp−1 … T−1 of k-row groups sharing [:Tp].

    The prompt [G, Tp] (left-padded) runs once per group with a cache; the cache is expanded to the
    B = G·k rows and the responses [B, T − Tp] run against it, positions continuing the prompt's.
    """
    backbone = hf.base_model
    prompt, prompt_mask = input_ids[::k, :width], attention_mask[::k, :width]  # [G, Tp]
    first = backbone(
        input_ids=prompt,
        attention_mask=prompt_mask,
        position_ids=position_ids(prompt_mask),
        use_cache=True,
    )
    cache = cache_of(first)
    cache.batch_repeat_interleave(k)  # [G, …] -> [B, …], rows grouped as the input's
    start = prompt_mask.sum(-1).repeat_interleave(k)[:, None]  # [B, 1] real prompt tokens
    positions = start + torch.arange(input_ids.shape[1] - width, device=input_ids.device)
    second = backbone(
        input_ids=input_ids[:, width:],
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        **{cache_kwarg(backbone): cache},
    )
    last_prompt = first.last_hidden_state[:, -1:].repeat_interleave(k, dim=0)  # [B, 1, H]
    return torch.cat([last_prompt, second.last_hidden_state], dim=1)


def regroup(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, groups: Tensor):
    """Right-padded rows [N, T] laid out as `[left-padded prompt | right-padded response]` in
    group order (row groups[g, j] at g·k + j): (ids, mask, prompt width Tp, response lengths [N]),
    or None when the rows of a group do not share their prompt tokens."""
    rows = groups.flatten()  # [N] in group order
    ids, mask, response = input_ids[rows], attention_mask[rows], response_mask[rows].bool()
    starts = response.long().argmax(-1)  # [N] prompt lengths (first response column)
    lengths = mask.sum(-1) - starts  # [N] response tokens
    k, width = groups.shape[1], int(starts.max())
    first = starts.view(-1, k)
    if not bool((first == first[:, :1]).all()):
        return None
    columns = torch.arange(width, device=ids.device)
    prompt = ids[:, :width].masked_fill(columns >= starts[:, None], 0)  # [N, Tp]
    grouped = prompt.view(-1, k, width)
    if not bool((grouped == grouped[:, :1]).all()):
        return None
    span = int(lengths.max())
    out = ids.new_zeros(len(rows), width + span)
    out_mask = torch.zeros_like(out)
    for i, (p, n) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        out[i, width - p : width] = ids[i, :p]  # left-padded prompt
        out_mask[i, width - p : width] = 1
        out[i, width : width + n] = ids[i, p : p + n]  # right-padded response
        out_mask[i, width : width + n] = 1
    return out, out_mask, width, lengths


def left_zeros(tail: Tensor, columns: int) -> Tensor:
    """[B, T', H] states with `columns` zero columns in front, [B, columns + T', H]."""
    return torch.cat([tail.new_zeros(tail.shape[0], columns, tail.shape[2]), tail], dim=1)


def cache_of(output):
    """The KV cache a backbone's output carries (`cache` or `past_key_values`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_kwarg(backbone) -> str:
    """The keyword the backbone's forward takes its KV cache by."""
    try:
        names = inspect.signature(backbone.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in names else "past_key_values"


_SAID: set[str] = set()


def fall_back(hf, why: str) -> bool:
    """Say once per model class and reason that the plain pass runs; False (not shared)."""
    name = type(hf).__name__
    if name + why not in _SAID:
        _SAID.add(name + why)
        print(f"[shared-prefix] {name}: {why}; using the plain forward (same numbers, more work)")
    return False


def can_share(hf, input_ids: Tensor, shared_prefix: tuple[int, int]) -> bool:
    """Whether this call may take the shared-prefix path (else the plain one, said once)."""
    k, width = shared_prefix
    rows, columns = input_ids.shape
    if k < 2 or rows % k or not 0 < width < columns:
        return False
    grouped = input_ids[:, :width].view(rows // k, k, width)
    if not bool((grouped == grouped[:, :1]).all()):  # rows of a group must share the prompt
        return False
    if torch.is_grad_enabled() and checkpointing(hf):
        return fall_back(hf, "activation checkpointing drops the cache in the backward pass")
    return shared_prefix_is_exact(hf)


def shared_prefix_is_exact(hf) -> bool:
    """A one-time probe per model object: shared-prefix states equal the plain pass's in float64
    (eval mode, 2 prompts × 2 responses, one prompt left-padded): the same computation, whatever
    round-off the model's own dtype and depth add to each (`probing`)."""
    cached = getattr(hf, "_rlhf_shared_prefix_is_exact", None)
    if cached is not None:
        return cached
    device = next(hf.parameters()).device
    vocab, pad = hf.get_input_embeddings().num_embeddings, hf.config.pad_token_id
    tokens = [i for i in range(1, 12) if i != pad and i < vocab]
    ids = torch.tensor([tokens[:7]] * 2 + [tokens[3:10]] * 2, device=device)  # [4, 7], Tp = 4
    mask = torch.ones_like(ids)
    mask[2:, :1] = 0  # the second prompt is left-padded
    mask[1, 6:] = 0  # a response that ended early
    exact = False
    try:
        with probing(hf, float64=True):
            plain = hf.base_model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)
            ).last_hidden_state[:, 3:]
            shared = shared_prefix_states(hf, ids, mask, 2, 4)
        real = mask[:, 3:].bool()
        exact = agree(plain[real], shared[real])
        why = "its shared-prefix states differ from the plain pass"
    except Exception as err:  # no external cache, or another cache layout
        why = f"it cannot run a prompt's cache against its responses ({type(err).__name__})"
    hf._rlhf_shared_prefix_is_exact = exact or fall_back(hf, why)
    return hf._rlhf_shared_prefix_is_exact
