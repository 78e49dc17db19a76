"""Masked reductions over response tokens.

Convention (whole package): ``mask`` is a float or bool tensor ``[B, T]``, 1 on response tokens
and 0 on padding. "Masked mean" is ``sum(x * mask) / sum(mask)``. A reduction over an all-zero
mask returns 0 (not NaN) so that an empty row contributes nothing, and its gradient stays finite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x * mask)`` over ``dim`` (all elements when ``dim`` is None)."""
    weighted = x * mask.to(x.dtype)
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x * mask) / sum(mask)`` over ``dim``; 0 where the mask sums to 0."""
    mask = mask.to(x.dtype)
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    # Dividing by a safe count (1 where empty) keeps both the value and its gradient finite there.
    safe_count = torch.where(count > 0, count, torch.ones_like(count))
    return torch.where(count > 0, total / safe_count, torch.zeros_like(total))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of the masked elements of ``x`` (a scalar).

    ``unbiased=False`` is the population variance ``masked_mean((x - mean)²)``; ``unbiased=True``
    applies Bessel's correction ``n / (n - 1)`` and needs at least two unmasked elements.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if not unbiased:
        return var
    count = mask.to(x.dtype).sum()
    if count < 2:
        raise ValueError(f"unbiased masked variance needs >= 2 unmasked elements (got {count:g})")
    return var * count / (count - 1)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Standardise the masked elements of ``x``: ``(x - mean) / sqrt(var + eps)``.

    Statistics are taken over every unmasked element of the batch, with the population variance
    (the difference from Bessel's correction is negligible at token counts). With
    ``shift_mean=False`` the mean is added back: only the scale changes (as TRL does for rewards).
    ``all_reduce`` (a sum over processes) takes the statistics over the global batch, so several
    processes whiten as one would. Values on padding are returned as they come out of the
    formula; mask them downstream.
    """
    if all_reduce is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=False)
    else:  # Σm, Σmx, Σmx² over every process, then the same formulas
        m = mask.to(x.dtype)
        sums = all_reduce(torch.stack([m.sum(), (m * x).sum(), (m * x * x).sum()]).detach())
        count = sums[0].clamp_min(1.0)
        mean = sums[1] / count
        var = (sums[2] / count - mean**2).clamp_min(0.0)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean
