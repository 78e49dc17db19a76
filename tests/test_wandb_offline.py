"""`logger=wandb` offline: a TINY `stage=rm` run, read back from the `.wandb` file it wrote.

Nothing is mocked: the real wandb writes its run file, and `helpers.read_wandb_records` parses it
the way `wandb sync` does. WANDB_BASE_URL points at a closed local port, so any attempt to reach a
server would fail the run instead of passing unnoticed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import (
    TINY,
    all_finite,
    compose,
    read_finished_wandb_run,
    read_wandb_history,
    wandb_run_file,
)

from rlhf_lightning.artifacts import MANIFEST
from rlhf_lightning.run import run

RM_KEYS = (
    "train/loss",
    "val/loss",
    "val/accuracy",
    "val/margin",
    "val/reward_chosen",
    "val/reward_rejected",
    "val/bayes_accuracy",
)


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """One TINY rm run with `logger=wandb` (conf/logger/wandb.yaml): (cfg, run output dir)."""
    cfg = compose(["stage=rm", *TINY, "logger=wandb"], tmp_path_factory.mktemp("wandb_run"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")  # what `mode: ${oc.env:WANDB_MODE,offline}` reads
        mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
        assert cfg.logger.mode == "offline"
        run(cfg)
    return cfg, Path(cfg.paths.output_dir)


def records_of(out_dir: Path, kind: str) -> list:
    records = read_finished_wandb_run(out_dir)
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def test_rm_metrics_are_in_the_wandb_history(wandb_run):
    cfg, out_dir = wandb_run
    history = read_wandb_history(out_dir)
    for key in RM_KEYS:
        assert key in history, f"{key} not logged; logged: {sorted(history)}"
        assert all_finite(history[key]), (key, history[key])
    assert len(history["train/loss"]) == math.ceil(256 / 32)  # every step of the one epoch
    manifest = json.loads((Path(cfg.paths.artifacts_dir) / "reviews" / "rm" / MANIFEST).read_text())
    for key in RM_KEYS[1:]:  # the last validation is what the artifact records
        assert history[key][-1] == pytest.approx(manifest["metrics"][key], abs=1e-6), key


def test_wandb_run_is_offline_named_and_finished(wandb_run):
    _, out_dir = wandb_run
    run_file = wandb_run_file(out_dir)
    assert run_file.parent.name.startswith("offline-run-")
    (header,) = records_of(out_dir, "run")
    assert header.telemetry.feature.offline
    assert (header.job_type, header.display_name) == ("rm", "rm")
    assert header.run_group == "reviews-run"  # <data name>-<output dir name>
    (exit_record,) = records_of(out_dir, "exit")  # wandb.finish() ran: the run is closed
    assert exit_record.exit_code == 0
    assert exit_record.runtime < 120  # no network retries (those take minutes)
    import wandb

    assert wandb.run is None
    internal = (run_file.parent / "logs" / "debug-internal.log").read_text()
    assert "127.0.0.1:9" not in internal  # the (unreachable) server was never contacted
    assert not [line for line in internal.splitlines() if '"level":"ERROR"' in line]


def test_composed_config_is_in_the_wandb_config(wandb_run):
    """A wandb run should record the composed config (seed, rm.*, task.*) to be reproducible."""
    _, out_dir = wandb_run
    keys = {item.key for config in records_of(out_dir, "config") for item in config.update}
    assert {"seed", "rm", "task"} <= keys or {"seed", "rm/max_epochs"} <= keys
