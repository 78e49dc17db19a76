"""A callback that counts gradient syncs per training batch (tests/test_ddp.py, tests/test_fsdp.py).

Added on the command line (`+callbacks.grad_sync._target_=grad_sync_probe.GradSyncProbe
+callbacks.grad_sync.out_dir=<dir>`). At the start of training it registers a DDP communication
hook on `trainer.model` (Lightning registers its own hooks on CUDA only) that all-reduces as DDP
does and counts: a backward pass that synchronises the gradient calls the hook once per bucket,
the last bucket last, so the number of `is_last()` buckets is the number of gradient all-reduces
and the elements of all buckets the amount reduced. It also counts every backward pass that goes
through the strategy (`manual_backward`). Each rank writes, per training batch, the optimiser steps
taken, backward passes, all-reduces and reduced elements to `<out_dir>/rank<r>.json`, with the
rank's real tokens and the seconds from the batch's start to its first gradient all-reduce (the
rank's own work; a faster rank then waits there for the slowest).

Under FSDP2 (`trainer=fsdp`) there is no DDP wrapper: the probe counts torch.distributed's
`reduce_scatter_single` (FSDP2's gradient sync, one per unit per synchronising backward; counted
in `all_reduces`, the reduce-scattered elements in `elements`) and `all_gather_single` (its weight
gathers, `all_gathers`), and, for a module with `rollout`, the all-gathers made inside each rollout
(`rollout_gathers`) and between the batch's start and the rollout (`gathers_before_rollout`).
"""

import json
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


class GradSyncProbe(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.counts = {"backward": 0, "all_reduces": 0, "elements": 0, "all_gathers": 0}
        self.fsdp_units = 0
        self.batches: list[dict] = []
        self._start: dict = {}
        self._t0, self._ready = 0.0, None

    def on_train_start(self, trainer, pl_module) -> None:
        ddp = trainer.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            ddp.register_comm_hook(self, _counting_allreduce)
        else:
            self._count_fsdp2(pl_module)
        backward = trainer.strategy.backward

        def counted(*args, **kwargs):
            self.counts["backward"] += 1
            return backward(*args, **kwargs)

        trainer.strategy.backward = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = {"steps": trainer.global_step, **self.counts}
        self._batch: dict = {}
        self._t0, self._ready = time.perf_counter(), None
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        self._tokens = None if mask is None else int(mask.sum())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = {"steps": trainer.global_step, **self.counts}
        row = {k: now[k] - self._start[k] for k in now}
        row["tokens"], row["ready_s"] = self._tokens, self._ready
        row.update(self._batch)
        self.batches.append(row)

    def _count_fsdp2(self, pl_module) -> None:
        import torch.distributed as dist
        from torch.distributed.fsdp import FSDPModule

        self.fsdp_units = sum(isinstance(m, FSDPModule) for m in pl_module.modules())
        assert self.fsdp_units >= 2, "trainer=fsdp should shard the trained network"
        reduce_scatter, all_gather = dist.reduce_scatter_single, dist.all_gather_single

        def counted_reduce_scatter(*args, **kwargs):
            if self._ready is None:
                self._ready = time.perf_counter() - self._t0
            self.counts["all_reduces"] += 1
            self.counts["elements"] += kwargs["output"].numel()
            return reduce_scatter(*args, **kwargs)

        def counted_all_gather(*args, **kwargs):
            self.counts["all_gathers"] += 1
            return all_gather(*args, **kwargs)

        dist.reduce_scatter_single = counted_reduce_scatter
        dist.all_gather_single = counted_all_gather
        rollout = getattr(pl_module, "rollout", None)
        if rollout is None:
            return

        def counted_rollout(*args, **kwargs):
            before = self.counts["all_gathers"]
            self._batch["gathers_before_rollout"] = before - self._start["all_gathers"]
            out = rollout(*args, **kwargs)
            self._batch["rollout_gathers"] = self.counts["all_gathers"] - before
            self._batch["response_tokens"] = int(out.response_mask.sum())
            return out

        pl_module.rollout = counted_rollout

    def on_train_end(self, trainer, pl_module) -> None:
        trained = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = {"trained_elements": trained, "batches": self.batches, "units": self.fsdp_units}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


def _counting_allreduce(probe: "GradSyncProbe", bucket) -> torch.futures.Future[torch.Tensor]:
    # (no `from __future__ import annotations`: DDP checks this return annotation as an object)
    if probe._ready is None:
        probe._ready = time.perf_counter() - probe._t0
    probe.counts["elements"] += bucket.buffer().numel()
    probe.counts["all_reduces"] += int(bucket.is_last())
    return default_hooks.allreduce_hook(None, bucket)  # DDP's own: mean over the world group
