"""The optimiser/schedule wiring shared by the supervised stages (SFT, reward model, DPO)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from rlhf_lightning.choices import DECAY_EXCLUSIONS  # what `no_decay` may name


def parameter_kind(module: nn.Module, name: str) -> str:
    """'bias', 'norm', 'embedding' or 'weight': what the parameter `name` of `module` is."""
    if name == "bias" or name.endswith("_bias"):
        return "bias"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if "norm" in type(module).__name__.lower():  # LayerNorm, LlamaRMSNorm, GroupNorm, ...
        return "norm"
    return "weight"


def weight_decay_groups(
    root: nn.Module, parameters: Iterable, no_decay: Iterable[str] = DECAY_EXCLUSIONS
) -> list[dict]:
    """Optimiser parameter groups of `parameters` (found inside `root`): those whose kind is in
    `no_decay` get `weight_decay=0.0`, the rest keep the optimiser's own weight decay.

    A tied parameter is classified by the first module that owns it (an embedding tied to an LM
    head is an embedding). Empty groups are dropped; with `no_decay` empty, one group.
    """
    wanted = {id(p): p for p in parameters}
    excluded = set(no_decay)
    decay, skip, seen = [], [], set()
    for module in root.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in wanted or id(param) in seen:
                continue
            seen.add(id(param))
            (skip if parameter_kind(module, name) in excluded else decay).append(param)
    decay += [p for i, p in wanted.items() if i not in seen]  # not under root: decayed as before
    groups = [{"params": decay}, {"params": skip, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def optimizers_with_schedule(
    parameters: Iterable, optimizer: Callable, scheduler: Callable | None, num_training_steps: int
):
    """`configure_optimizers` output: the optimiser, plus a per-step schedule when configured.

    parameters: tensors or parameter groups (`weight_decay_groups`), as torch optimisers take.
    Schedules such as `transformers.get_cosine_schedule_with_warmup` need the run length, so the
    scheduler partial is called with `num_training_steps` (Lightning's estimated stepping batches).
    """
    opt = optimizer(parameters)
    if scheduler is None:
        return opt
    schedule = scheduler(opt, num_training_steps=num_training_steps)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
