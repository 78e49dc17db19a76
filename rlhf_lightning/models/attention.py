"""Attention's backward for short half-precision sequences on a CPU: the same forward, a faster
and more precise gradient.

Under `bf16-mixed` on a CPU, PyTorch's SDPA runs its flash kernel, whose backward recomputes the
attention block by block in bfloat16; at the lengths of chat RLHF (a ~46-token prompt, responses
of ~48) that backward is most of the attention's cost. `train_attention()` — entered by the
training passes (`response_logprobs`, `reward_scores`) — keeps the flash kernel's forward (the
same op with the same arguments: bitwise the same output, so a pass under grad scores exactly
what a no-grad pass of the same weights scores, e.g. DPO's precomputed reference at step 0) and
computes the backward from its saved log-sum-exp in float32 with whole-matrix products.

Measured (session 10, 1 thread, bf16, 9 heads of 64): attention forward + backward 1.3–2.5×
faster for query × key lengths up to 64 × 320, and the gradient closer to float64's (max error
2.0–4.9e-3 relative against the flash backward's 2.6–9.0e-3); at 256 × 256 and beyond the flash
backward is faster, so longer attention keeps it (`MAX_SCORES`). It takes over only where all of
these hold: CPU tensors computed in bfloat16 or float16 (their own dtype, or CPU autocast's,
whose cast is made here as autocast makes it) that need a gradient, no dropout, heads of equal
count or grouped (`enable_gqa`: the key/value heads repeated here), and a boolean or additive
mask or a square causal one. Anything else is SDPA's own call.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from rlhf_lightning.models.heads import checkpointing

MAX_SCORES = 1 << 15  # query × key positions per head up to which the backward is ours
_HALF = (torch.bfloat16, torch.float16)


class _FlashForwardFloatBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, mask, is_causal: bool, scale: float):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=mask, scale=scale
        )
        ctx.save_for_backward(query, key, value, mask, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # float32 products, whatever the caller's context
    def backward(ctx, grad_out):
        query, key, value, mask, out, lse = ctx.saved_tensors
        dtype = query.dtype
        q, k, v, d_out = query.float(), key.float(), value.float(), grad_out.float()
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(ctx.scale)  # [B, H, Lq, Lk]
        if mask is not None:
            scores = scores + mask.float()
        if ctx.is_causal:
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        p = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num_(0.0)  # a row with no key: 0
        d_value = torch.matmul(p.transpose(-2, -1), d_out)
        d_p = torch.matmul(d_out, v.transpose(-2, -1))
        d_scores = p.mul_(d_p - (d_out * out.float()).sum(-1, keepdim=True)).mul_(ctx.scale)
        d_query = torch.matmul(d_scores, k)
        d_key = torch.matmul(d_scores.transpose(-2, -1), q)
        return d_query.to(dtype), d_key.to(dtype), d_value.to(dtype), None, None, None


def _arguments(args, kwargs) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def run_dtype(query: Tensor) -> torch.dtype:
    """The dtype SDPA computes a CPU call in: the autocast dtype under CPU autocast (which casts
    floating inputs for SDPA), else the query's."""
    if query.is_floating_point() and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return query.dtype


def takes_over(call: dict) -> bool:
    """Whether an SDPA call (its bound arguments) goes through the float32 backward."""
    query, key, value = call["query"], call["key"], call["value"]
    mask, causal = call.get("attn_mask"), bool(call.get("is_causal", False))
    if not (query.device.type == "cpu" and run_dtype(query) in _HALF):
        return False
    dtypes = {t.dtype for t in (query, key, value)}  # under autocast, cast to one: may differ
    if (
        query.dim() != 4
        or key.dim() != 4
        or not (len(dtypes) == 1 or torch.is_autocast_enabled("cpu"))
    ):
        return False
    if not all(t.is_floating_point() for t in (query, key, value)):
        return False
    if not any(t.requires_grad for t in (query, key, value)) or call.get("dropout_p", 0.0):
        return False
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads and not (call.get("enable_gqa", False) and heads % kv_heads == 0):
        return False
    if query.shape[2] * key.shape[2] > MAX_SCORES:
        return False
    if causal and (mask is not None or query.shape[2] != key.shape[2]):
        return False
    return mask is None or (
        mask.dim() == 4 and (mask.dtype == torch.bool or mask.is_floating_point())
    )


def attention(call: dict) -> Tensor:
    """SDPA's output for the call, through `_FlashForwardFloatBackward` (`takes_over(call)`)."""
    dtype = run_dtype(call["query"])  # autocast's cast, made here as autocast makes it
    query, key, value = (call[name].to(dtype) for name in ("query", "key", "value"))
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: kv head h // groups
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    mask = call.get("attn_mask")
    if mask is not None and mask.dtype == torch.bool:  # as SDPA converts it for its kernels
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(
            mask.logical_not(), float("-inf")
        )
    elif mask is not None:
        mask = mask.to(query.dtype)
    scale = call.get("scale")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    causal = bool(call.get("is_causal", False))
    return _FlashForwardFloatBackward.apply(query, key, value, mask, causal, scale)


class _TrainAttention(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = _arguments(args, kwargs)
            if takes_over(call):
                return attention(call)
        return func(*args, **kwargs)


def train_attention(model: torch.nn.Module | None = None):
    """Context for a pass of `model` under grad: SDPA calls that `takes_over` accepts get the
    float32 backward; a no-op without grad, while compiling, inside another such context, or
    for a model with activation checkpointing on (its backward recomputes the forward outside
    this context, and torch's checkpoint refuses a recomputation that saves other tensors)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if model is not None and (not _may_take_over(model) or checkpointing(model)):
        return contextlib.nullcontext()  # (the first: no Python hook on every op for nothing)
    if any(isinstance(mode, _TrainAttention) for mode in _get_current_function_mode_stack()):
        return contextlib.nullcontext()
    return _TrainAttention()


def _may_take_over(model: torch.nn.Module) -> bool:
    """Whether a pass of `model` can compute attention in half precision on a CPU: its weights on
    the CPU and either CPU autocast to bf16/fp16 on or half-precision weights. Elsewhere (float32
    runs, GPUs) the mode is not entered: it costs ~1 ms a step on a tiny model (measured)."""
    weight = next(model.parameters(), None)
    if weight is None or weight.device.type != "cpu":
        return False
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _HALF
    return autocast or weight.dtype in _HALF
