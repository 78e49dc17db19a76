"""Test-wide settings and the composed-config fixtures (STYLE.md convention 8).

`tiny_cfg_base` composes the TINY config once per package; `tiny_cfg` is a copy of it rooted in
the test's own `tmp_path`, so every test writes its data, artifacts and logs somewhere fresh.
"""

from __future__ import annotations

import os

# Before anything imports transformers or wandb: no Hub access, wandb writes to disk only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core machine two
# threads per process oversubscribe it (measured: a TINY rm run 2 s with 1 thread, 4-20 s with 2).
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for subprocesses (train.py)

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TINY, compose, with_paths  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="package")
def tiny_cfg_base(tmp_path_factory) -> DictConfig:
    """`stage=rm` on the TINY sizes, composed once (its paths point at a throwaway folder)."""
    return compose(["stage=rm", *TINY], tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture
def tiny_cfg(tiny_cfg_base: DictConfig, tmp_path) -> DictConfig:
    """A fresh copy of the TINY config with data, artifacts and outputs under `tmp_path`."""
    return with_paths(tiny_cfg_base, tmp_path)
