"""`StepTime`: wall seconds of each training step and the process's peak memory, every stage.

    time/step_seconds   wall time of one training batch: a step of SFT, the RM or DPO (all its
                        micro-batches); one rollout of the policy stage (sample, score, update)
    memory/peak_rss_mib the process's resident-set high-water mark so far (`getrusage`; Linux KiB),
                        logged at the end of each step: models, optimiser state and activations

The step is the training step alone: conf/callbacks/default.yaml puts this callback first, so its
`on_train_batch_end` runs before the evaluations other callbacks run at the end of a step (KL,
over-optimisation, preference accuracy, samples), which are not a training step's cost.
What README's cost tables quote (`benchmarks/stage_costs.py` reads them back from `logger=csv`).
Logging at `on_train_batch_end` adds no synchronisation: the clock reads the host's time, so on a
GPU it includes what the step waited for, which is what a step costs.
"""

from __future__ import annotations

import resource
import sys
import time

import lightning as L


class StepTime(L.Callback):
    stages = ("sft", "rm", "policy", "dpo")

    def __init__(self) -> None:
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        seconds = time.perf_counter() - self._start
        pl_module.log("time/step_seconds", seconds, on_step=True, on_epoch=False, batch_size=1)
        pl_module.log(
            "memory/peak_rss_mib", peak_rss_mib(), on_step=True, on_epoch=False, batch_size=1
        )


def peak_rss_mib() -> float:
    """The process's peak resident set size in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)
