"""Micro-batches with gradient accumulation: the one mechanism every stage uses to fit in memory.

A stage's batch size is the GLOBAL batch of one optimiser step (whatever the number of
processes); a micro-batch is how many sequences go through the network at once. One step is

    zero_grad;  for each micro-batch m:  backward( W · (n_m / N) · L_m );  clip;  step

with L_m the mean loss over the n_m units of m (tokens for SFT and the policy, pairs for the
reward model and DPO), N = Σ n_m over every micro-batch of every rank and W the number of ranks.
Then Σ_m (n_m/N)·L_m is the mean over the global batch, and DDP's gradient average divided back
by W (see `distributed.global_mean_scale`) makes it the one-process gradient: a run with
micro-batches ends with the weights of a run without, within fp32 round-off. The step is one
`training_step`, so a checkpoint never falls between two micro-batches.

Plans (which rows travel together) are either a fixed number of units per micro-batch, or a
token budget: units sorted by length and packed while `count · longest ≤ max_tokens`, so short
sequences travel many at a time and long ones few (veRL's dynamic batch size). Under several
processes every rank runs the same number of backward passes (a rank with fewer micro-batches
joins the others' collectives with zero-gradient passes), and only the last of them all-reduces
the gradient: the others run under DDP's `no_sync` (`distributed.local_gradients`), so a step
costs one gradient all-reduce whatever the number of micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from rlhf_lightning.distributed import all_reduce_sum, local_gradients, world_size
from rlhf_lightning.errors import NumericalError, ResourceError


def plan(
    n: int,
    size: int | None = None,
    lengths: Sequence[int] | None = None,
    max_tokens: int | None = None,
) -> list[Tensor]:
    """Indices [n_m] of the units in each micro-batch (every unit exactly once).

    size: at most this many units per micro-batch (None: no limit). max_tokens: with `lengths`,
    pack units (longest first) while count × longest length ≤ max_tokens; a unit longer than the
    budget travels alone. Neither: one micro-batch of everything (today's full-batch step).
    """
    if n == 0:
        return []
    if max_tokens is None:
        step = n if size is None else size
        return list(torch.arange(n).split(step))
    if lengths is None or len(lengths) != n:
        raise ValueError("a token budget needs one length per unit")
    order = sorted(range(n), key=lambda i: -lengths[i])
    parts, current, longest = [], [], 0
    for i in order:
        width = max(longest, lengths[i])
        full = size is not None and len(current) >= size
        if current and (full or (len(current) + 1) * width > max_tokens):
            parts.append(torch.tensor(sorted(current)))
            current, width = [], lengths[i]
        current.append(i)
        longest = width
    parts.append(torch.tensor(sorted(current)))
    return parts


def padded_fraction(lengths: Sequence[int], parts: Sequence[Tensor]) -> float:
    """Share of the computed positions that are padding when each part is padded to its longest."""
    real = sum(lengths)
    computed = sum(len(p) * max(lengths[i] for i in p.tolist()) for p in parts if len(p))
    return 1.0 - real / computed if computed else 0.0


def trim_columns(attention_mask: Tensor) -> slice:
    """The column range holding every real token of a (sub-)batch: leading and trailing columns
    that are padding in every row carry nothing (position ids come from the mask)."""
    used = attention_mask.bool().any(0).nonzero().flatten()
    if used.numel() == 0:
        return slice(0, attention_mask.shape[1])
    return slice(int(used[0]), int(used[-1]) + 1)


def chunked(fn: Callable[[Tensor], Tensor | tuple], n: int, size: int | None):
    """`fn(rows)` over consecutive chunks of at most `size` rows, outputs concatenated on dim 0.

    For no-grad passes (log p_old, log p_ref, values, rewards): the same numbers as one call on
    all rows, with the memory of one chunk. `fn` returns a tensor or a tuple of tensors/None.
    """
    if size is None or size >= n:
        return fn(torch.arange(n))
    outs = [fn(rows) for rows in torch.arange(n).split(size)]
    if isinstance(outs[0], tuple):
        return tuple(None if o[0] is None else torch.cat(list(o)) for o in zip(*outs))
    return torch.cat(outs)


def optimiser_step(
    module,
    optimizer,
    backward: Callable[[], dict[str, Tensor] | None],
    max_grad_norm: float | None = None,
    scheduler=None,
) -> dict[str, Tensor]:
    """One optimiser step, the same in every stage: zero the gradients, `backward()` (e.g. an
    `accumulate` over micro-batches, or one `manual_backward`), clip by the global norm over every
    rank's gradients (`sharding.clip_grad_norm`: FSDP1/2, DeepSpeed, plain), step, schedule, and
    free the gradients (`zero_grad`'s `set_to_none`): what runs between two steps — validation,
    the policy's rollout (sampling, reference, reward) — does not carry a gradient the size of
    the trained weights (540 MB for SmolLM2 in fp32), as the HF Trainer does not.
    Returns what `backward` returns (its diagnostics), or {}."""
    from rlhf_lightning.sharding import clip_grad_norm

    optimizer.zero_grad()
    stats = backward() or {}
    if max_grad_norm:
        clip_grad_norm(module, optimizer, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad()
    return stats


def accumulate(
    module,
    parts: Sequence,
    loss_of: Callable[[object], dict[str, Tensor]],
    count_of: Callable[[object], Tensor | float],
    what: str = "loss",
    fix: str = "lower the learning rate",
    spare=None,
) -> dict[str, Tensor]:
    """Backward of the global-mean loss over `parts` (micro-batches of this rank); no step.

    loss_of(part) -> {"loss": mean over the part's units, other keys: detached diagnostics, also
    means over the part}; count_of(part) -> its units. Returns each diagnostic as this rank's
    share of the global mean (the logger's mean over ranks, sync_dist, is the global mean).
    A non-finite micro-batch loss raises NumericalError before its backward (no step is taken).
    A rank with fewer micro-batches than another joins the others' passes with zero gradients:
    `zero_loss` (a sum of the parameters × 0) under DDP; under FSDP2, whose collectives run in the
    forward and backward hooks of each unit, a real micro-batch's loss × 0 (`parts[0]`, else
    `spare`, a part of the caller's choosing), so every rank runs the same units in the same order.
    """
    counts = [float(count_of(p)) for p in parts]
    device = module.device
    total = float(all_reduce_sum(torch.tensor(sum(counts), device=device)))
    passes = _max_over_ranks(len(parts), device)
    stats: dict[str, Tensor] = {}
    scale_all = world_size() / max(total, 1e-12)
    for i in range(passes):
        # one gradient all-reduce per step: every pass but the last keeps its gradients local
        local = local_gradients(module, local=i < passes - 1)
        if i >= len(parts):  # fewer micro-batches here than on another rank
            with local:
                module.manual_backward(_filler_loss(module, parts, loss_of, spare))
            continue
        with shape_on_failure(module, parts[i]), local:
            out = loss_of(parts[i])
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise NumericalError(
                    f"{what} is {loss.item()} at step {module.global_step}; the last good "
                    f"checkpoint is kept ({fix})"
                )
            weight = counts[i] * scale_all
            module.manual_backward(loss * weight)
        for key, value in out.items():
            if value.dim() == 0:  # scalar diagnostics; per-unit outputs are the caller's
                stats[key] = stats.get(key, 0.0) + value.detach() * weight
    return stats


def zero_loss(module) -> Tensor:
    """A loss whose gradient is zero for every trained parameter (joins DDP's all-reduce)."""
    return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0


def _filler_loss(module, parts: Sequence, loss_of: Callable, spare) -> Tensor:
    from rlhf_lightning.fsdp2 import is_fsdp2

    if not is_fsdp2(module.trainer):
        return zero_loss(module)
    part = parts[0] if len(parts) else spare
    if part is None:
        raise RuntimeError("under FSDP2 a rank without micro-batches needs a spare part")
    return loss_of(part)["loss"] * 0.0


def _max_over_ranks(n: int, device) -> int:
    if world_size() == 1:
        return n
    import torch.distributed as dist

    t = torch.tensor(n, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, MemoryError)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError.

    Not Lightning's `utilities.memory.is_oom_error`: it matches message texts only ("CUDA" and
    "out of memory", "DefaultCPUAllocator: can't allocate memory", one argument), so it misses
    Python's MemoryError and a `torch.OutOfMemoryError` whose text names no CUDA (ROCm, XPU)."""
    if isinstance(err, OOM_ERRORS):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def _shape(part) -> str:
    """ "N sequences × T tokens" of a micro-batch (a dict batch, a Rollout or a tuple led by one)."""
    if isinstance(part, str):  # already said
        return part
    if isinstance(part, tuple):
        part = part[0]
    tensor = part.get("input_ids") if isinstance(part, dict) else getattr(part, "input_ids", None)
    if tensor is None:
        return "?"
    return f"{tensor.shape[0]} sequences × {tensor.shape[1]} tokens"


@contextlib.contextmanager
def shape_on_failure(module, part) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into a ResourceError that names the stage,
    the shape that did not fit and the settings to lower."""
    try:
        yield
    except BaseException as err:
        if not is_out_of_memory(err):
            raise
        raise out_of_memory(getattr(module, "stage_name", "train"), _shape(part)) from err


def out_of_memory(stage: str, shape: str) -> ResourceError:
    hints = {
        "sft": "sft.micro_batch_size",
        "rm": "rm.micro_batch_size",
        "dpo": "dpo.micro_batch_size",
        "policy": "policy.micro_batch_size, policy.forward_batch_size",
    }
    lower = hints.get(stage, f"{stage}.micro_batch_size")
    return ResourceError(
        f"out of memory in the {stage} stage at {shape}; the last checkpoint is kept — lower "
        f"{lower}, or set model.gradient_checkpointing=true (or a token budget, "
        f"{stage}.max_tokens_per_micro_batch)"
    )
