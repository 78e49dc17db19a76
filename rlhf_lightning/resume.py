"""Resuming exactly: which checkpoint `ckpt_path` means, the RNG state a checkpoint carries, and
loading checkpoints without unpickling code.

Each stage checkpoints into `<run dir>/checkpoints/<stage>/` (`last.ckpt` is the newest). A new
invocation gets a new Hydra run dir, so `ckpt_path=last` looks for the run to resume:
  1. the current run dir, when it already holds checkpoints (`hydra.run.dir=<old run dir>`);
  2. else its newest sibling holding one (`outputs/<stage>/<time>/` by default; newest by the
     time `last.ckpt` was written). In a multirun only the job's own dir is searched: resume a
     sweep with `hydra.sweep.dir=<old sweep dir>`.
Every stage of the run then resumes from its own `last.ckpt` there, and a stage without one starts
afresh; resuming is exact, so a stage that had finished retrains its tail to the same weights.
`ckpt_path=<run dir>` does the same with that directory, `ckpt_path=<file.ckpt>` resumes a
single-stage run from that file. A path that does not exist fails at start-up.

Lightning 2.6 calls `torch.load(weights_only=None)`: torch >= 2.6 then loads weights only, older
torch unpickles arbitrary objects. `SafeCheckpointIO` always passes `weights_only=True`, so a
checkpoint can hold tensors and plain values but never code.
"""

from __future__ import annotations

import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rlhf_lightning.errors import ArtifactError, ConfigError

LAST = "last.ckpt"
_RESUME_FIX = "give a run directory, a .ckpt file or `last`, or leave ckpt_path unset to start anew"


def quiet_resume_warnings() -> None:
    """Silence two Lightning warnings that do not apply to our resume.

    Our datamodules restore their position themselves (`data.batching.ResumableSampling`), so the
    warning that a plain DataLoader cannot resume mid-epoch is wrong here; and the one about a
    changed dirpath concerns top-k models, of which ModelCheckpoint keeps none (a resumed run
    writes its checkpoints into its own run dir).
    """
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
    warnings.filterwarnings("ignore", message="The dirpath has changed from")


def checkpoint_dir(run_dir: Path, stage: str) -> Path:
    """Where a stage of a run writes its checkpoints."""
    return Path(run_dir) / "checkpoints" / stage


def resolve_checkpoints(
    ckpt_path: str | None, stages: list[str], run_dir: Path, siblings: bool = True
) -> dict[str, str]:
    """{stage: checkpoint file} to resume from for `ckpt_path` (see the module docstring)."""
    if ckpt_path is None:
        return {}
    if not isinstance(ckpt_path, str) or not ckpt_path.strip():
        raise ConfigError(f"ckpt_path={ckpt_path!r} is invalid — fix: {_RESUME_FIX}")
    if ckpt_path == "last":
        source = latest_run_dir(Path(run_dir), stages, siblings)
        if source is None:
            where = f"'{run_dir}'"
            if siblings:
                where += f" or beside it in '{Path(run_dir).parent}'"
            raise ConfigError(
                f"ckpt_path=last: no checkpoints/<stage>/{LAST} for {stages} in {where} — "
                f"fix: {_RESUME_FIX}"
            )
        return _stage_checkpoints(source, stages)
    path = Path(ckpt_path)
    if is_checkpoint(path):
        if len(stages) != 1:
            raise ConfigError(
                f"ckpt_path={ckpt_path} is one checkpoint file but this run has stages {stages} "
                "— fix: give the run directory or `last` (each stage resumes from its own file)"
            )
        return {stages[0]: str(path)}
    if path.is_dir() and len(stages) == 1 and is_checkpoint(path / LAST):
        return {stages[0]: str(path / LAST)}  # a stage's checkpoints folder
    if not path.is_dir():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist — fix: {_RESUME_FIX}")
    found = _stage_checkpoints(path, stages)
    if not found:
        raise ConfigError(
            f"ckpt_path={ckpt_path} holds no checkpoints/<stage>/{LAST} for {stages} — "
            f"fix: {_RESUME_FIX}"
        )
    return found


def latest_run_dir(run_dir: Path, stages: list[str], siblings: bool = True) -> Path | None:
    """`run_dir` if it holds a checkpoint of `stages`, else its newest sibling that does."""
    if _stage_checkpoints(run_dir, stages):
        return run_dir
    if not siblings or not run_dir.parent.is_dir():
        return None
    newest, when = None, -1.0
    for candidate in run_dir.parent.iterdir():
        found = _stage_checkpoints(candidate, stages) if candidate.is_dir() else {}
        written = max((Path(p).stat().st_mtime for p in found.values()), default=-1.0)
        if written > when:
            newest, when = candidate, written
    return newest


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint (`trainer=fsdp` with
    save_distributed_checkpoint=true: a folder of per-rank shards whose `meta.pt`, written last
    by rank zero, holds everything but the weights and optimiser state)."""
    path = Path(path)
    return path.is_file() or (path / "meta.pt").is_file()


def _stage_checkpoints(run_dir: Path, stages: list[str]) -> dict[str, str]:
    files = {stage: checkpoint_dir(run_dir, stage) / LAST for stage in stages}
    return {stage: str(path) for stage, path in files.items() if is_checkpoint(path)}


# ---- RNG state ----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch (CPU, CUDA), Python and NumPy RNG states, as tensors and plain values only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RNGState(L.Callback):
    """Checkpoints carry the RNG states; a resumed run restores them before its first step.

    Lightning saves none, so without this sampling (policy rollouts, minibatch order) and dropout
    would continue from the seed instead of where the run stopped. The state is taken when the
    checkpoint is written (ModelCheckpoint runs after the other callbacks) and set again at the
    first `on_train_batch_start` after loading; this callback goes first in the list, so hooks run
    on resume only (an evaluation at train start) do not shift it. DataLoaders draw their base seed
    from their own generator (the datamodules pass one), so data loading leaves the global RNG
    alone. With several processes every rank restores rank zero's state, as every rank was seeded
    alike by `seed_everything`.
    """

    def __init__(self):
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None


# ---- loading ------------------------------------------------------------------------------------


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but loading with `weights_only=True` whatever the caller asks.

    A file holding anything beyond tensors and plain values, or one that is cut short, fails with
    one ArtifactError line naming it; nothing in it is executed.
    """

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = next((x for x in lines if "Unsupported" in x), lines[0] if lines else "")
            raise ArtifactError(
                f"'{path}' holds pickled objects, which are never loaded (they can run code): "
                f"{reason} — fix: resume only from checkpoints rlhf-lightning wrote"
            ) from None
        except (RuntimeError, EOFError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ArtifactError(
                f"cannot read checkpoint '{path}' ({first}) — fix: resume from an earlier "
                "checkpoint, or start afresh without ckpt_path"
            ) from None
