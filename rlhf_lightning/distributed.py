"""What several processes (`trainer=ddp`) share: global sums, loss normalisation, rank zero.

Batch sizes in the config are *global*: each rank takes its slice of every global batch (see
`LengthGroupedBatchSampler`). So that the result does not depend on how many processes there are,
every mean over a batch is taken over the global batch. DDP averages gradients over ranks, so a
rank's loss must be scaled to `world · (local sum) / (global count)`; `global_mean_scale` gives the
factor. Without an initialised process group everything here is the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if world_size() > 1 else 0


def is_rank_zero() -> bool:
    """True on the process that writes files: Lightning's rank, read from the environment before
    the process group exists and set by the strategy after."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def all_reduce_sum(x: Tensor) -> Tensor:
    """The sum of `x` over all ranks (a new detached tensor; `x` itself on one process)."""
    if world_size() == 1:
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def global_mean_scale(local_count: Tensor | float) -> float:
    """Factor turning a rank's local mean into its share of the global mean.

    With L_r = S_r / n_r the local mean, DDP's gradient average (1/W)·Σ_r ∇(c_r·L_r) equals
    ∇(Σ_r S_r / N) when c_r = W · n_r / N, N = Σ_r n_r. On one process c = 1.
    """
    if world_size() == 1:
        return 1.0
    n = torch.as_tensor(local_count, dtype=torch.float64).detach().reshape(())
    return float(world_size() * n / all_reduce_sum(n).clamp_min(1e-12))


@contextlib.contextmanager
def local_gradients(module, local: bool = True) -> Iterator[None]:
    """Backward passes inside the block accumulate gradients on this rank only (DDP `no_sync`);
    the first backward outside it all-reduces everything accumulated, once.

    In manual optimisation Lightning arms DDP's reducer before every `manual_backward`
    (`DDPStrategy.pre_backward`), so each backward would all-reduce the whole gradient; its
    `block_backward_sync` (DDP's `no_sync`) keeps the reducer disarmed. Every rank must then run
    the same number of backward passes with the sync on the same one (`microbatch.accumulate`).
    FSDP2 (`trainer=fsdp`): `set_requires_gradient_sync(False)` on every unit (its `no_sync`;
    Lightning's block_backward_sync does nothing there), so the backward outside the block
    reduce-scatters everything accumulated, once. No-op with `local=False`, on one process, and
    under FSDP1 (reduce-scatters in every backward) and DeepSpeed (accumulates in its engine).
    """
    from lightning.pytorch.strategies import ParallelStrategy

    from rlhf_lightning.fsdp2 import is_fsdp2, set_gradient_sync

    strategy = module.trainer.strategy
    if not local or not isinstance(strategy, ParallelStrategy):
        yield
        return
    if is_fsdp2(module.trainer):
        set_gradient_sync(module, False)
        try:
            yield
        finally:
            set_gradient_sync(module, True)
        return
    with strategy.block_backward_sync():
        yield


def rank_offset(n: int, device=None) -> tuple[int, int]:
    """(rows on the ranks before this one, rows on all ranks) for a batch split in rank order."""
    if world_size() == 1:
        return 0, n
    sizes = torch.zeros(world_size(), dtype=torch.long, device=device)
    sizes[dist.get_rank()] = n
    sizes = all_reduce_sum(sizes)
    return int(sizes[: dist.get_rank()].sum()), int(sizes.sum())
