"""Hydra multirun β sweeps (in a subprocess, as a user runs them) and the sweep report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import TINY, TINY_MODEL, compose, train_cli

from rlhf_lightning.run import run
from rlhf_lightning.sweep_report import main as report_main

TINY_CLI = [o for o in TINY if not o.startswith("logger=")] + ["logger=wandb"]


@pytest.fixture(scope="module")
def artifacts_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    run(compose(["stage=pipeline", "policy.steps=1", *TINY], root))
    return root


def _read_table(sweep: Path) -> list[dict]:
    with open(sweep / "report.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_beta_multirun_writes_one_job_per_beta_and_a_report(artifacts_root: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    shared = artifacts_root / "artifacts/reviews"
    before = {stage: (shared / stage).resolve() for stage in ("sft", "rm", "policy")}
    proc = train_cli(
        ["-m", "stage=policy", "algo.beta=0.01,0.1,1", *TINY_CLI, f"hydra.sweep.dir={sweep}"],
        artifacts_root,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 3
    for job in jobs:
        result = json.loads((job / "result.json").read_text())
        assert result["status"] == "completed" and result["stages"] == ["policy"]
        assert any(o.startswith("algo.beta=") for o in result["overrides"])
        assert list(job.rglob("run-*.wandb")), "each job is its own wandb run"
    # nothing was retrained or overwritten: the shared artifacts are the same folders as before,
    # and each job saved its own policy in its run dir
    assert {stage: (shared / stage).resolve() for stage in before} == before
    assert all((job / "artifacts/policy/config.json").exists() for job in jobs)
    rows = _read_table(sweep)
    assert len(rows) == 3 and sorted(float(r["beta"]) for r in rows) == [0.01, 0.1, 1.0]
    assert (sweep / "report.md").read_text().count("\n| ") >= 3
    assert "Best gold reward: β =" in (sweep / "report.md").read_text()
    assert (sweep / "frontier.png").stat().st_size > 1000
    # wandb: one group named after the sweep, run names carry β
    from helpers import read_wandb_records

    groups, names = set(), set()
    for job in jobs:
        for record in read_wandb_records(next(job.rglob("run-*.wandb"))):
            if record.WhichOneof("record_type") == "run":
                groups.add(record.run.run_group)
                names.add(record.run.display_name)
    assert len(groups) == 1 and next(iter(groups)).startswith("sweep-")
    assert all("algo.beta=" in n for n in names) and len(names) == 3


@pytest.mark.slow
def test_a_failed_job_is_marked_and_the_others_are_reported(artifacts_root: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    # the second job asks for an RM that does not exist: it fails, the first still completes
    proc = train_cli(
        [
            "-m",
            "stage=policy",
            "reward.path=null,/nonexistent/rm",
            *[o for o in TINY if o != "logger=csv"],
            "logger=none",
            f"hydra.sweep.dir={sweep}",
        ],
        artifacts_root,
        timeout=900,
    )
    assert proc.returncode != 0
    assert "1 of 2 sweep jobs failed" in proc.stderr
    rows = {r["job"]: r for r in _read_table(sweep)}
    assert rows["0"]["status"] == "completed" and rows["1"]["status"] == "failed"
    assert "reward-model" in rows["1"]["error"]
    assert "Failed jobs: 1" in (sweep / "report.md").read_text()


def test_report_command_usage(tmp_path: Path, capsys):
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "usage" in capsys.readouterr().err


def test_launcher_configs_compose():
    for launcher in ("joblib", "slurm", "submitit_slurm"):
        from helpers import CONF_DIR
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(
                "config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True
            )
        assert "launcher" in cfg.hydra and cfg.hydra.launcher._target_


def test_beta_sweep_experiment_composes():
    cfg = compose(["experiment=beta_sweep"])
    assert cfg.stage.name == "policy"


@pytest.mark.slow
def test_oracle_beta_sweep_stays_under_the_optimal_frontier(tmp_path: Path):
    """4 β values on the exact task: KL falls as β grows, no job beats the frontier, gaps reported."""
    oracle = [
        "task=oracle",
        "task.n_sft=400",
        "task.n_sft_val=64",
        "task.n_pairs_train=64",
        "task.n_pairs_val=32",
        "task.n_pairs_test=32",
        *TINY_MODEL,
        "logger=csv",
        "trainer.enable_progress_bar=false",
    ]
    run(compose(["stage=sft", "sft.max_epochs=2", *oracle], tmp_path))
    sweep = tmp_path / "sweep"
    proc = train_cli(
        [
            "-m",
            "stage=policy",
            "reward=gold",
            "algo.beta=0.1,0.3,1,3",
            "policy.steps=40",
            "policy.prompts_per_step=8",
            "policy.optimizer.lr=2e-3",
            "policy.eval_samples=16",
            "callbacks=none",
            *oracle,
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sorted(_read_table(sweep), key=lambda r: float(r["beta"]))
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    kls = [float(r["exact_kl"]) for r in rows]
    assert kls == sorted(kls, reverse=True), f"KL must fall as β grows: {kls}"
    assert not any(r["above_frontier"] == "True" for r in rows), rows
    for r in rows:  # each job reports its gap to J*_β and its closure
        assert float(r["optimum_gap"]) >= -1e-4 and r["closure"] != ""
    print((sweep / "report.md").read_text())
