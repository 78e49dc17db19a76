"""FSDP2 (torch's `fully_shard`) under Lightning's `ModelParallelStrategy`: `trainer=fsdp`.

Each process is one data-parallel rank; every trained network (the LightningModule's children
with trainable parameters: the policy, its value head, the reward model being trained) is sharded
over all ranks, one FSDP unit per decoder layer (the classes its `_no_split_modules` names) and one
for the rest of the network (embeddings, final norm, head). Between forwards a rank holds 1/W of
every trained weight, gradient and optimiser state, as DTensors.

The frozen reference and reward model stay whole on every rank, outside the optimiser and the
checkpoint (they live outside the module tree, `_frozen`): they have no gradients or optimiser
state to shard, sharding their weights would cost an all-gather per layer per forward, and the
rank-zero evaluation runs them alone.

What FSDP2 needs from the rest of the code:
- every call into a trained network goes through its root module's `forward` (FSDP2 gathers the
  root's own weights, and hooks the gradient reduce-scatter, there): the split backbone + head
  fast paths (`models/heads.head_is_exact`, the score head, the shared prefix) call the backbone
  and the head apart, so `shard_trained` turns them off on the trained network, and says so;
- every rank runs the same forwards and backwards (collectives): a rank with fewer micro-batches
  runs a real micro-batch with its loss × 0 (`microbatch.accumulate`), not a parameter sum;
- `unsharded` gathers every unit's weights once and keeps them whole until the block ends (for a
  rollout: one all-gather per unit, not one per layer per decoded token; for rank-zero work:
  forwards, `generate` and `save_pretrained` with no collective inside).
See https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import PreTrainedModel

from rlhf_lightning.artifacts import atomic_directory
from rlhf_lightning.errors import ConfigError

# the cached verdicts of the one-time fast-path probes (models/heads, reward_scores,
# shared_prefix): False makes every pass call the network's own forward
SPLIT_PATH_PROBES = ("_rlhf_head_is_exact", "_rlhf_score_is_exact", "_rlhf_shared_prefix_is_exact")


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as pure data parallelism: every process a data-parallel rank.

    Lightning's `data_parallel_size="auto"` means the number of nodes (its "auto" tensor-parallel
    size takes the GPUs of a node); here it is the world size, num_nodes × devices, and the
    tensor-parallel size 1. save_distributed_checkpoint: False writes one `last.ckpt` gathered on
    rank 0; True a folder of per-rank shards (`last.ckpt/`, for models too big to gather).
    """

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """A sharded checkpoint is put in place whole, as artifacts are: every rank writes into the
        fresh hidden folder of `artifacts.atomic_directory`, which rank zero swaps in as
        `last.ckpt` in one step once all have written. (Lightning writes into `last.ckpt/` itself,
        so a process killed mid-save left the only checkpoint a mix of two steps' shards or with
        a cut `meta.pt`.)"""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        with contextlib.ExitStack() as swap:
            folder = None
            if self.global_rank == 0:
                folder = str(swap.enter_context(atomic_directory(Path(filepath))))
            folder = self.broadcast(folder)
            super().save_checkpoint(checkpoint, folder, storage_options)
            self.barrier()  # every rank's shard and rank zero's meta.pt are written
        self.barrier()  # swapped in before any rank goes on


def is_fsdp2(trainer) -> bool:
    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def check_fsdp2(strategy) -> None:
    """Refuse tensor parallelism (ModelParallelStrategy's other axis): nothing here splits layers."""
    tp = strategy._tensor_parallel_size
    if tp not in (1, "auto") or (tp == "auto" and not isinstance(strategy, FSDP2Strategy)):
        raise ConfigError(
            f"ModelParallelStrategy with tensor_parallel_size={tp}: only data parallelism (FSDP2) "
            "is supported — use trainer=fsdp (rlhf_lightning.fsdp2.FSDP2Strategy), or "
            "tensor_parallel_size=1 with data_parallel_size=<number of processes>"
        )


def trained_networks(module: nn.Module) -> list[nn.Module]:
    """The LightningModule's children that hold trainable parameters (frozen models live outside
    the module tree; metrics hold no parameters)."""
    return [c for c in module.children() if any(p.requires_grad for p in c.parameters())]


def shard_trained(module) -> None:
    """`configure_model` under FSDP2: `fully_shard` each decoder layer, then each trained network
    as a whole, over the data-parallel mesh. No-op under other strategies and when done already."""
    trainer = module._trainer
    if trainer is None or not is_fsdp2(trainer):
        return
    mesh = trainer.strategy.device_mesh["data_parallel"]
    turned_off = []
    for network in trained_networks(module):
        if isinstance(network, FSDPModule):
            continue
        layers = set()
        for sub in network.modules():
            layers.update(getattr(sub, "_no_split_modules", None) or ())
            if isinstance(sub, PreTrainedModel):  # its own forward from now on
                turned_off.append(type(sub).__name__)
                for name in SPLIT_PATH_PROBES:
                    setattr(sub, name, False)
        for sub in list(network.modules()):
            if type(sub).__name__ in layers:
                fully_shard(sub, mesh=mesh)
        fully_shard(network, mesh=mesh)
    if turned_off and trainer.is_global_zero:
        print(
            f"[fsdp] {', '.join(sorted(set(turned_off)))}: split backbone/head and shared-prefix "
            "passes off (FSDP2 gathers the root's weights in its own forward); whole forwards"
        )


def fsdp_units(module: nn.Module) -> list[FSDPModule]:
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """FSDP2's `no_sync`: with sync=False backward passes accumulate unsharded gradients locally;
    the next backward with sync=True reduce-scatters everything accumulated, once."""
    for unit in fsdp_units(module):
        unit.set_requires_gradient_sync(sync, recurse=False)


@contextlib.contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """Whole weights in every FSDP unit under `module` for the block: one all-gather per unit at
    entry, none inside, the shards again at exit. Every rank must enter; inside, no backward.

    - `unshard()` on every unit, with reshard-after-forward off (FSDP2 would otherwise free a
      layer's weights after each forward and gather them again for the next token);
    - the mark `_is_fsdp_managed_module` lifted, so transformers' `generate` does not default to
      `synced_gpus` (an all-reduce per token, which rank zero alone would wait on forever);
    - FSDP2's state-dict pre-hooks (which reshard) held back, so `save_pretrained` writes the
      whole tensors. Changes to weights inside are lost at exit (read-only, as FSDP1's
      `summon_full_params(writeback=False)`).
    """
    units = fsdp_units(module)
    if not units:
        yield
        return
    groups = [g for u in units for g in u._get_fsdp_state()._fsdp_param_groups]
    states = [u._get_fsdp_state() for u in units]
    saved_reshard = [g.post_forward_mesh_info for g in groups]
    saved_auto = [s._auto_reshard_after_forward for s in states]
    marked = [m for m in module.modules() if getattr(m, "_is_fsdp_managed_module", False)]
    hooks = [(m, k, h) for m in module.modules() for k, h in list(m._state_dict_pre_hooks.items())]
    hooks = [(m, k, h) for m, k, h in hooks if getattr(h, "__name__", "") == "to_sharded_hook"]
    try:
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        for m in marked:
            m._is_fsdp_managed_module = False
        for m, key, _ in hooks:
            del m._state_dict_pre_hooks[key]
        yield
    finally:
        for m, key, hook in hooks:
            m._state_dict_pre_hooks[key] = hook
        for m in marked:
            m._is_fsdp_managed_module = True
        for group, mesh_info in zip(groups, saved_reshard, strict=True):
            group.post_forward_mesh_info = mesh_info
        for state, auto in zip(states, saved_auto, strict=True):
            state._auto_reshard_after_forward = auto
        for unit in units:
            unit.reshard()
