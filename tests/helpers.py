"""Shared test helpers: compose the Hydra config outside an app, run `train.py`, read wandb runs.

Import from any test as `from helpers import TINY, compose, ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# Everything small and fast: a few hundred rows, a 1-layer 32-wide Llama, one epoch, CSV logs.
TINY_TASK: list[str] = [
    "task.n_sft=256",
    "task.n_pairs_train=256",
    "task.n_pairs_val=64",
    "task.n_pairs_test=64",
    "task.n_prompts_train=64",
    "task.n_prompts_eval=16",
]
TINY_MODEL: list[str] = [  # model=tiny only (model=hf has no `config` keys to override)
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=2",
]
TINY_TRAINING: list[str] = [
    "sft.max_epochs=1",
    "rm.max_epochs=1",
    "policy.steps=3",
    "policy.prompts_per_step=4",
    "policy.eval_samples=16",
    "policy.generation.max_new_tokens=12",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",  # a tiny run has fewer steps than the default interval
]
TINY: list[str] = TINY_TASK + TINY_MODEL + TINY_TRAINING

# What a subprocess needs to run offline and quietly.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",  # tiny models; more threads only oversubscribe a shared CPU
}


def compose(overrides: list[str], tmp_path: Path | None = None) -> DictConfig:
    """The config `train.py` would get for `overrides`, rooted at `tmp_path` when given.

    `paths.output_dir` is `${hydra:runtime.output_dir}` in an app; outside one it does not
    resolve, so it is set to `tmp_path/run` here.
    """
    cfg = _compose(tuple(overrides))
    return with_paths(cfg, tmp_path) if tmp_path is not None else copy.deepcopy(cfg)


@functools.lru_cache(maxsize=256)
def _compose(overrides: tuple[str, ...]) -> DictConfig:
    """Composition takes ~0.3 s; callers get deep copies of this cached result."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def with_paths(cfg: DictConfig, tmp_path: Path) -> DictConfig:
    """A copy of `cfg` whose data, artifacts and run outputs all live under `tmp_path`."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(Path(tmp_path) / "run")
    return cfg


# What a start-up config check must not need: `python_without(script, HEAVY)` makes them unimportable
HEAVY = ("torch", "transformers", "lightning")


def python_without(script: str, modules: tuple[str, ...]) -> list[str]:
    """The command that runs `script` (train.py, eval.py) as `python <script>` does, with `modules`
    unimportable (each import of them raises ImportError): what the script does before importing
    them, it does without them."""
    code = (
        f"import runpy, sys; sys.modules.update(dict.fromkeys({list(modules)!r})); "
        f"sys.argv[0] = {script!r}; runpy.run_path({script!r}, run_name='__main__')"
    )
    return [sys.executable, "-c", code]


def script_cli(
    script: str,
    args: list[str],
    root: Path,
    timeout: float = 300,
    env: dict | None = None,
    without: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run `python <script> <args> paths.root_dir=<root>` (train.py, eval.py) from the repo root,
    offline, with `env` added (`without`: modules it may not import, see `python_without`)."""
    python = python_without(script, without) if without else [sys.executable, script]
    return subprocess.run(
        [*python, *args, f"paths.root_dir={root}"],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_cli(
    args: list[str], root: Path, timeout: float = 300, without: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`python train.py <args> paths.root_dir=<root>` (see `script_cli`)."""
    return script_cli("train.py", args, root, timeout, without=without)


# ---- wandb run files ---------------------------------------------------------------------------
# A `run-<id>.wandb` file is a LevelDB-style log (the format `wandb sync` reads): a 7-byte header
# (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
# (crc32, length, type: FULL/FIRST/MIDDLE/LAST); a chunk never straddles a block, a block tail
# shorter than a header is zero padding. The payload of each record is a serialized
# `wandb.proto.wandb_internal_pb2.Record`. wandb 0.31 ships no Python reader (its `sync` runs in
# the Go wandb-core), so the reader is written out here from the format.

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_run_file(directory: Path) -> Path:
    """The one `run-*.wandb` file under `directory` (e.g. a run's output dir)."""
    found = sorted({p.resolve() for p in Path(directory).rglob("run-*.wandb")})
    if len(found) != 1:
        raise AssertionError(f"expected one run-*.wandb under {directory}, found {found}")
    return found[0]


def read_wandb_records(path: Path) -> list:
    """Every `Record` protobuf of a `.wandb` file, in order; checksums verified."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a wandb run file (header {ident!r} {magic:#x} {version})")
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding (or the unwritten end of the file)
            pos += _BLOCK - pos % _BLOCK
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += _HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def read_finished_wandb_run(directory: Path, timeout: float = 60.0) -> list:
    """The records of the run under `directory`, once its final `exit` record is on disk.

    wandb 0.31 returns from `wandb.finish()` before wandb-core has flushed an offline run file
    (seen: only the 7-byte header right after `finish`, all records ~0.5 s later), so poll.
    """
    path, deadline = wandb_run_file(directory), time.monotonic() + timeout
    while True:
        try:
            records = read_wandb_records(path)
        except ValueError:  # a chunk being written: its checksum does not match yet
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            kinds = [r.WhichOneof("record_type") for r in records]
            raise AssertionError(f"{path}: no exit record after {timeout} s (records: {kinds})")
        time.sleep(0.1)


def read_wandb_history(run_dir: Path) -> dict[str, list]:
    """Logged history of the finished wandb run under `run_dir`: key -> values in logging order.

    Values are JSON-decoded (numbers come back as floats/ints); `_step`, `_runtime` and
    `_timestamp` bookkeeping keys are left out.
    """
    history: dict[str, list] = defaultdict(list)
    for record in read_finished_wandb_run(run_dir):
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                history[key].append(json.loads(item.value_json))
    return dict(history)


def all_finite(values: list) -> bool:
    return bool(values) and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
