"""`trainer=fsdp` (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes (gloo)
gives the weights of one process, syncs gradients once per optimiser step, gathers the policy's
weights once per rollout, and resumes from a sharded checkpoint after a SIGKILL.

Tolerance: parameters within 1e-5 (absolute), as tests/test_ddp.py; measured 7e-9 (sft), 1.2e-7
(rm, micro-batches of 3), 7e-8 (ppo, micro-batches of 3) on the tiny runs below. The runs differ
only in float summation order (another batch split, reduce-scatter instead of one process's sum).
The reference and reward model stay whole on every rank; artifacts are gathered whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose, train_cli, with_paths
from hydra.utils import instantiate
from test_ddp import _max_diff, _metrics, _ok, _weights

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.fsdp2 import FSDP2Strategy, check_fsdp2
from rlhf_lightning.run import run as run_in_process

TOL = 1e-5
BASE = [*TINY, "callbacks=none", "rm.batch_size=16", "policy.prompts_per_step=8"]
FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]


# ---- configuration (fast) ----------------------------------------------------------------------


def test_fsdp_config_is_fsdp2_data_parallel(tmp_path):
    strategy = instantiate(compose(FSDP, tmp_path).trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy._tensor_parallel_size == 1
    assert not strategy._save_distributed_checkpoint  # one gathered last.ckpt by default
    check_fsdp2(strategy)


def test_tensor_parallelism_is_refused_in_one_line():
    from lightning.pytorch.strategies import ModelParallelStrategy

    with pytest.raises(ConfigError, match="tensor_parallel_size=2: only data parallelism"):
        check_fsdp2(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    with pytest.raises(ConfigError, match="tensor_parallel_size=auto"):
        check_fsdp2(ModelParallelStrategy())  # "auto" would be tensor parallel over a node


# ---- end to end: two FSDP2 processes vs one ----------------------------------------------------


def _probe(base: Path, name: str, monkeypatch) -> tuple[list[str], Path]:
    """The gradient-sync probe (tests/grad_sync_probe.py) as a callback of a run."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    out = base / f"probe_{name}"
    hook = ["+callbacks.grad_sync._target_=grad_sync_probe.GradSyncProbe"]
    return [*hook, f"+callbacks.grad_sync.out_dir={out}"], out


def _ranks(probe: Path) -> list[dict]:
    return [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]


def _one_sync_per_step(ranks: list[dict], micro: int) -> None:
    """Per optimiser step each FSDP unit reduce-scatters once (the last backward), whatever the
    number of backward passes; the scattered shards add up to the whole gradient."""
    trained, units = ranks[0]["trained_elements"], ranks[0]["units"]
    for rank in ranks:
        steps = sum(b["steps"] for b in rank["batches"])
        assert steps >= 2
        for batch in rank["batches"]:
            assert batch["all_reduces"] == batch["steps"] * units >= units
            per_step = 2 * batch["elements"] / batch["steps"]  # two ranks' shards
            assert trained <= per_step <= 1.01 * trained  # + dim-0 padding to the world size
        assert sum(b["backward"] for b in rank["batches"]) >= micro * steps  # micro-batches
    assert [b["backward"] for b in ranks[0]["batches"]] == [
        b["backward"] for b in ranks[1]["batches"]
    ]


def test_a_sharded_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """`FSDP2Strategy.save_checkpoint` with shards: Lightning's writer (here a stand-in that writes
    a shard, then `meta.pt`, into the folder it is given) writes into a hidden folder swapped in
    as `last.ckpt` in one step, so a save killed midway leaves the last complete checkpoint as it
    was, `ckpt_path=last` finds it, and the next save clears what the killed one left."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from rlhf_lightning.resume import resolve_checkpoints

    def write(self, checkpoint, filepath, storage_options=None):
        folder = Path(filepath)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__0_0.distcp").write_text(str(checkpoint["step"]))
        if checkpoint.get("killed"):
            raise KeyboardInterrupt  # the process dies before meta.pt
        torch.save({"global_step": checkpoint["step"]}, folder / "meta.pt")

    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", write)
    strategy = FSDP2Strategy(save_distributed_checkpoint=True)
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "policy" / "last.ckpt"

    def step_of(folder: Path) -> int:
        step = torch.load(folder / "meta.pt", weights_only=True)["global_step"]
        assert (folder / "__0_0.distcp").read_text() == str(step)  # shards of the same step
        return step

    strategy.save_checkpoint({"step": 2}, last)
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint({"step": 4, "killed": True}, last)
    assert step_of(last) == 2
    assert resolve_checkpoints("last", ["policy"], run_dir) == {"policy": str(last)}
    strategy.save_checkpoint({"step": 6}, last)
    assert step_of(last) == 6
    live = last.resolve()
    assert [p for p in last.parent.iterdir() if p.is_dir() and p != last] == [live]  # no strays


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An SFT model and a reward model, trained by one process."""
    root = tmp_path_factory.mktemp("fsdp")
    for stage in ("sft", "rm"):
        _ok(train_cli([*BASE, f"stage={stage}", f"hydra.run.dir={root}/{stage}1"], root))
    return root


@pytest.mark.slow
def test_sft_two_fsdp_processes_equal_one(base):
    other = base / "artifacts_sft"
    run = [f"paths.artifacts_dir={other}", f"hydra.run.dir={base}/sft2"]
    out = _ok(train_cli([*BASE, "stage=sft", *FSDP, *run], base))
    assert (base / "sft2" / "train_ddp_process_1.log").exists()  # a second process did run
    assert "split backbone/head and shared-prefix passes off" in out.stdout  # said once
    whole = _weights(base / "artifacts" / "reviews" / "sft")
    assert _max_diff(_weights(other / "reviews" / "sft"), whole) < TOL
    one, two = _metrics(base / "sft1", "sft"), _metrics(base / "sft2", "sft")
    assert len(one["train/loss"]) == len(two["train/loss"]) > 5
    assert max(abs(a - b) for a, b in zip(one["train/loss"], two["train/loss"])) < TOL
    assert one["train/loss"][-1] < one["train/loss"][0] - 0.05  # it learned: not vacuous


@pytest.mark.slow
def test_rm_two_fsdp_processes_in_micro_batches_equal_one(base, monkeypatch):
    hook, probe = _probe(base, "rm", monkeypatch)
    other = base / "artifacts_rm"
    run = [f"paths.artifacts_dir={other}", f"hydra.run.dir={base}/rm2", "rm.micro_batch_size=3"]
    out = _ok(train_cli([*BASE, "stage=rm", *FSDP, *run, *hook], base))
    assert out.stdout.count("== rlhf-lightning summary ==") == 1
    whole = _weights(base / "artifacts" / "reviews" / "rm")
    assert _max_diff(_weights(other / "reviews" / "rm"), whole) < TOL
    one, two = _metrics(base / "rm1", "rm"), _metrics(base / "rm2", "rm")
    for key in ("train/loss", "train/accuracy"):
        assert max(abs(a - b) for a, b in zip(one[key], two[key])) < TOL, key
    _one_sync_per_step(_ranks(probe), micro=3)  # 8 pairs per rank: 3 micro-batches


@pytest.mark.slow
def test_ppo_two_fsdp_processes_equal_one_and_gather_once_per_rollout(base, monkeypatch):
    """Value head, GAE, 2 epochs × 2 minibatches in micro-batches of 3 (a rank with fewer joins
    with a real micro-batch × 0); each rollout samples on weights gathered once (one all-gather
    per FSDP unit before `rollout`, none inside it), and a full checkpoint holds whole tensors."""
    policy = [*BASE, "stage=policy", "algo=ppo", "policy.steps=3"]
    _ok(train_cli([*policy, f"hydra.run.dir={base}/ppo1"], base))
    one_w = _weights(base / "artifacts" / "reviews" / "policy")
    hook, probe = _probe(base, "ppo", monkeypatch)
    micro = ["policy.micro_batch_size=3", "policy.forward_batch_size=5"]
    run = [f"hydra.run.dir={base}/ppo2", "checkpoint.every_n_train_steps=2"]
    _ok(train_cli([*policy, *FSDP, *micro, *run, *hook], base))
    two_w = _weights(base / "artifacts" / "reviews" / "policy")
    assert _max_diff(one_w, two_w) < TOL
    assert _max_diff(one_w, _weights(base / "artifacts" / "reviews" / "sft")) > 1e-4  # it moved
    m1, m2 = _metrics(base / "ppo1", "policy"), _metrics(base / "ppo2", "policy")
    for key in ("train/kl", "train/reward", "ppo/value_loss", "ppo/clipfrac"):
        assert len(m1[key]) == len(m2[key]) == 3, key
        assert max(abs(a - b) for a, b in zip(m1[key], m2[key])) < TOL, key
    ranks = _ranks(probe)
    _one_sync_per_step(ranks, micro=1)  # PPO: 4 optimiser steps per rollout
    units = ranks[0]["units"]  # decoder layer, policy root, value head
    for rank in ranks:
        for batch in rank["batches"]:
            assert batch["gathers_before_rollout"] == units  # once per unit per rollout ...
            assert batch["rollout_gathers"] == 0  # ... and never while sampling
            assert batch["response_tokens"] >= 8 * 4  # tokens were decoded
    last = torch.load(base / "ppo2/checkpoints/policy/last.ckpt", weights_only=True)
    state = last["state_dict"]
    assert (
        state["policy.model.embed_tokens.weight"].shape == one_w["model.embed_tokens.weight"].shape
    )
    assert not any(k.startswith(("reference", "_frozen", "reward")) for k in state)
    assert last["optimizer_states"] and "beta_controller" in last


@pytest.mark.slow
def test_dpo_two_fsdp_processes_in_micro_batches_equal_one(base):
    dpo = [*BASE, "stage=dpo", "dpo.batch_size=16", "dpo.max_epochs=1"]
    _ok(train_cli([*dpo, f"hydra.run.dir={base}/dpo1"], base))
    one_w = _weights(base / "artifacts" / "reviews" / "dpo")
    run = [f"hydra.run.dir={base}/dpo2", "dpo.micro_batch_size=3"]
    _ok(train_cli([*dpo, *FSDP, *run], base))
    assert _max_diff(one_w, _weights(base / "artifacts" / "reviews" / "dpo")) < TOL
    assert _max_diff(one_w, _weights(base / "artifacts" / "reviews" / "sft")) > 1e-4


@pytest.mark.slow
def test_fsdp_rloo_killed_and_resumed_from_sharded_checkpoints_equals_one_process(base):
    """SIGKILL both ranks after a sharded checkpoint (a folder of per-rank shards); `ckpt_path=last`
    on 2 FSDP2 processes reloads shards, optimiser, β and sampler position, and ends where one
    uninterrupted process does."""
    from test_faults import spawn, wait_for

    policy = [*BASE, "stage=policy", "algo=rloo", "kl_controller=adaptive", "policy.steps=6"]
    policy += ["checkpoint.every_n_train_steps=2"]
    runs = base / "resume"
    run_in_process(with_paths(compose(policy), base))  # one process, uninterrupted, here
    whole = _weights(base / "artifacts" / "reviews" / "policy")
    sharded = [*FSDP, "trainer.strategy.save_distributed_checkpoint=true"]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = [*policy, *sharded, f"hydra.run.dir={runs}/crash/first"]
    crashed = spawn(first, base, "slowpolicy:1.0", **quiet)
    meta = wait_for("resume/crash/first/checkpoints/policy/last.ckpt/meta.pt", base, crashed)
    os.killpg(crashed.pid, signal.SIGKILL)  # rank zero and the rank it started
    assert crashed.wait(timeout=30) == -signal.SIGKILL
    assert torch.load(meta, weights_only=True)["global_step"] < 6
    assert len(list(meta.parent.glob("*.distcp"))) == 2  # one shard file per rank
    second = [*policy, *sharded, "ckpt_path=last", f"hydra.run.dir={runs}/crash/second"]
    resumed = _ok(train_cli(second, base))
    assert "[policy] resuming from" in resumed.stdout
    assert _max_diff(_weights(base / "artifacts" / "reviews" / "policy"), whole) < TOL
