"""`trainer=ddp trainer.devices=2` (CPU, gloo) gives the result of one process on the same global batch.

Tolerance: parameters within 1e-5 (absolute) and logged metrics within 1e-5 after a few steps. The
two runs differ only in float summation order (another batch split, another padding width), which
the tiny runs below measure at ~1e-7. What makes them equal: batch sizes are global and each rank
takes a slice of every batch (`LengthGroupedBatchSampler`), losses are global means
(`distributed.global_mean_scale`), whitening and baselines use global statistics, the β controller
reads the global KL, and each sample's random draws are keyed by its prompt (`sample_seeds`), so a
sample is the same whichever rank draws it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose, train_cli, with_paths

from rlhf_lightning.config import validate
from rlhf_lightning.data.batching import LengthGroupedBatchSampler, rank_deal, rank_slice
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.generation.keyed import KeyedGumbelSampling, sample_seeds
from rlhf_lightning.losses import masked_whiten, reinforce_advantages
from rlhf_lightning.run import run as run_in_process

TOL = 1e-5


# ---- sharding, keyed sampling and global statistics (fast) -------------------------------------


@pytest.mark.parametrize("deal", [True, False])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_global_batch(world, deal):
    lengths = [i % 7 for i in range(101)]
    one = LengthGroupedBatchSampler(lengths, 8, seed=3)
    ranks = [
        LengthGroupedBatchSampler(lengths, 8, seed=3, num_replicas=world, rank=r, deal=deal)
        for r in range(world)
    ]
    expected = [b for b in one if len(b) >= world]  # a batch smaller than the world is dropped
    per_rank = [list(s) for s in ranks]
    assert all(len(p) == len(expected) for p in per_rank)  # same step count on every rank
    for step, batch in enumerate(expected):
        shares = [p[step] for p in per_rank]
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        if deal:  # the ranks' shares make the batch, each in the batch's order
            assert sorted(sum(shares, [])) == sorted(batch)
            assert all(s == [i for i in batch if i in s] for s in shares)
        else:  # contiguous slices in rank order
            assert sum(shares, []) == batch


def test_rank_slice_sizes():
    assert [rank_slice(list(range(5)), 2, r) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(rank_slice(list(range(7)), 3, r)) for r in range(3)] == [3, 2, 2]
    assert [rank_deal(list(range(7)), 3, r) for r in range(3)] == [[0, 5, 6], [1, 4], [2, 3]]


@pytest.mark.parametrize("world", [2, 4])
def test_dealt_ranks_hold_similar_token_counts(world):
    """Length-sorted batches dealt across ranks: every step the ranks' tokens differ by at most
    the longest minus the shortest unit, within 10 % here (1.005-1.015x on average); contiguous
    slices make the last rank the longest every step (1.5-1.9x the shortest on average)."""
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(8, 200, (2000,), generator=g)]

    def tokens_per_step(deal: bool) -> list[list[int]]:
        kw = dict(seed=1, group=4, num_replicas=world, deal=deal)
        samplers = [LengthGroupedBatchSampler(lengths, 32, rank=r, **kw) for r in range(world)]
        return [[sum(lengths[i] for i in s) for s in shares] for shares in zip(*samplers)]

    for step, tokens in enumerate(tokens_per_step(deal=True)):
        assert max(tokens) - min(tokens) <= max(lengths) - min(lengths), step
        assert max(tokens) / min(tokens) < 1.1, step
    contiguous = tokens_per_step(deal=False)
    assert all(t[-1] == max(t) for t in contiguous)  # the straggler that dealing removes
    assert sum(max(t) / min(t) for t in contiguous) / len(contiguous) > 1.3


def test_keyed_gumbel_sampling_draws_from_softmax():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0]])
    temperature = 0.7
    seeds = sample_seeds(0, 0, range(20_000), 1)
    processor = KeyedGumbelSampling(seeds, temperature, torch.device("cpu"))
    scores = processor(None, logits.expand(len(seeds), -1))
    freq = torch.bincount(scores.argmax(-1), minlength=5).double() / len(seeds)
    expected = torch.softmax(logits[0].double() / temperature, -1)
    assert (freq - expected).abs().sum() / 2 < 0.015  # total variation; ~0.005 at this n


def test_keyed_sample_does_not_depend_on_its_batch():
    seeds = sample_seeds(1, 7, [3, 4, 5, 6], 2)
    assert len(set(seeds)) == 8
    assert sample_seeds(1, 7, [5], 2) == seeds[4:6]  # a key's seeds, whatever else is drawn
    assert sample_seeds(1, 8, [5], 2) != seeds[4:6]  # a new rollout draws anew
    logits = torch.randn(8, 11)
    full = KeyedGumbelSampling(seeds, 1.0, torch.device("cpu"))(None, logits)
    part = KeyedGumbelSampling(seeds[4:6], 1.0, torch.device("cpu"))(None, logits[4:6])
    assert torch.equal(full[4:6], part)


def _split_all_reduce(*parts_stats):
    """A fake all-reduce for rank 0 of a split batch: adds the other ranks' contributions."""
    return lambda local: local + sum(parts_stats)


def test_global_whitening_and_baseline_equal_one_process():
    x, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    whole = masked_whiten(x, mask)
    m1 = mask[3:]
    other = torch.stack([m1.sum(), (m1 * x[3:]).sum(), (m1 * x[3:] ** 2).sum()])
    part = masked_whiten(x[:3], mask[:3], all_reduce=_split_all_reduce(other))
    assert torch.allclose(part * mask[:3], whole[:3] * mask[:3], atol=1e-5)
    s = torch.randn(8)
    other = torch.stack([s[5:].sum(), torch.tensor(3.0)])
    part = reinforce_advantages(s[:5], all_reduce=_split_all_reduce(other))
    assert torch.allclose(part, reinforce_advantages(s)[:5], atol=1e-6)


@pytest.mark.parametrize("key", ["rm.batch_size", "sft.batch_size", "policy.prompts_per_step"])
def test_a_batch_smaller_than_the_world_fails_at_start(key, tmp_path):
    cfg = compose(["trainer=ddp", "trainer.devices=4", f"{key}=3"], tmp_path)
    with pytest.raises(ConfigError, match=rf"{key}=3 is smaller than the 4 processes"):
        validate(cfg)
    validate(compose(["trainer=ddp", "trainer.devices=4", f"{key}=4"], tmp_path))  # enough


def test_ddp_inside_a_multirun_is_refused_in_one_line(tmp_path):
    out = train_cli(["-m", *TINY, "stage=rm", "trainer=ddp", "rm.max_epochs=1,2"], tmp_path)
    assert out.returncode != 0
    assert "trainer.devices=2 inside a Hydra multirun" in out.stdout + out.stderr
    assert not list(tmp_path.rglob("train_ddp_process_1.log"))  # no process was started


# ---- end to end: two processes vs one ----------------------------------------------------------

BASE = [*TINY, "callbacks=none", "rm.batch_size=16", "policy.prompts_per_step=8"]
DDP = ["trainer=ddp", "trainer.devices=2"]


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _weights(artifact: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(artifact / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _metrics(run_dir: Path, stage: str) -> dict[str, list[float]]:
    """Per-step train/* and ppo/* columns of the CSV logger."""
    (path,) = (run_dir / "csv" / stage).rglob("metrics.csv")
    series: dict[str, list[float]] = {}
    for row in csv.DictReader(path.open()):
        for key, value in row.items():
            if key.startswith(("train/", "ppo/")) and value:
                series.setdefault(key, []).append(float(value))
    return series


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An SFT model and a reward model, trained by one process."""
    root = tmp_path_factory.mktemp("ddp")
    for stage in ("sft", "rm"):
        _ok(train_cli([*BASE, f"stage={stage}", f"hydra.run.dir={root}/{stage}1"], root))
    return root


@pytest.mark.slow
def test_rm_stage_two_processes_equal_one(base, monkeypatch):
    """2 processes, each in micro-batches of 3 pairs, give the weights of one full-batch process,
    and all-reduce the gradient once per optimiser step (8 pairs per rank: 3 micro-batches)."""
    other = base / "artifacts_ddp"
    args = [*BASE, "stage=rm", f"paths.artifacts_dir={other}", f"hydra.run.dir={base}/rm2"]
    probe = base / "grad_sync_rm"
    hook = _grad_sync_probe(probe, monkeypatch)
    out = _ok(train_cli([*args, *DDP, "rm.micro_batch_size=3", *hook], base))  # and micro-batches
    _assert_one_all_reduce_per_step(probe)
    assert (base / "rm2" / "train_ddp_process_1.log").exists()  # a second process did run
    assert "[rm] accuracy=" in out.stdout  # rank zero reports once
    assert out.stdout.count("== rlhf-lightning summary ==") == 1
    assert (
        _max_diff(
            _weights(other / "reviews" / "rm"), _weights(base / "artifacts" / "reviews" / "rm")
        )
        < TOL
    )
    one, two = _metrics(base / "rm1", "rm"), _metrics(base / "rm2", "rm")
    assert len(one["train/loss"]) == len(two["train/loss"]) > 5
    for key in ("train/loss", "train/accuracy"):  # logged with sync_dist: the global batch
        assert max(abs(a - b) for a, b in zip(one[key], two[key])) < TOL, key


@pytest.mark.slow
def test_rm_keep_best_two_processes_equal_one(tmp_path):
    """rm.keep=best under DDP: both ranks reload best.ckpt after `fit` and validate it again; the
    kept validation, its weights and its metrics are one process's (six epochs of lr 1e-3: the
    best validation is not the last)."""
    args = [*BASE, "stage=rm", "rm.keep=best", "rm.max_epochs=6"]
    manifests, weights = [], []
    for name, extra in (("one", []), ("two", DDP)):
        where = [f"paths.artifacts_dir={tmp_path / name}", f"hydra.run.dir={tmp_path / name}"]
        _ok(train_cli([*args, *extra, *where], tmp_path))
        artifact = tmp_path / name / "reviews" / "rm"
        manifests.append(json.loads((artifact / "rlhf_artifact.json").read_text()))
        weights.append(_weights(artifact))
    one, two = manifests
    assert one["kept"]["step"] == two["kept"]["step"] < one["kept"]["steps"], one["kept"]
    assert _max_diff(*weights) < TOL
    for key in ("val/loss", "val/accuracy", "val/margin"):
        assert abs(one["metrics"][key] - two["metrics"][key]) < TOL, key
    assert one["metrics"]["val/loss"] == pytest.approx(one["kept"]["score"], abs=1e-6)


def _policy_pair(
    base: Path, name: str, extra: list[str], ddp_extra: tuple[str, ...] = ()
) -> tuple[dict, dict, Path, Path]:
    weights = []
    for tag, launch in (("1", []), ("2", [*DDP, *ddp_extra])):
        run = base / f"{name}{tag}"
        _ok(train_cli([*BASE, "stage=policy", f"hydra.run.dir={run}", *extra, *launch], base))
        weights.append(_weights(base / "artifacts" / "reviews" / "policy"))
    return weights[0], weights[1], base / f"{name}1", base / f"{name}2"


@pytest.mark.slow
def test_policy_stage_two_processes_equal_one(base):
    """rloo with an adaptive β: rollouts, updates, β and the final evaluation all match."""
    extra = ["algo=rloo", "kl_controller=adaptive", "policy.steps=4"]
    one_w, two_w, one, two = _policy_pair(base, "rloo", extra)
    assert (two / "train_ddp_process_1.log").exists()
    assert _max_diff(one_w, two_w) < TOL
    m1, m2 = _metrics(one, "policy"), _metrics(two, "policy")
    assert len(m1["train/kl"]) == len(m2["train/kl"]) == 4
    for key in ("train/kl", "train/beta", "train/reward", "train/objective"):
        assert max(abs(a - b) for a, b in zip(m1[key], m2[key])) < TOL, key
    assert len(set(m1["train/beta"])) > 1  # β moved: the controller saw the (global) KL
    r1 = _result(one)["results"]["policy"]
    r2 = _result(two)["results"]["policy"]
    for key in ("proxy_reward", "kl", "gold_reward", "beta"):
        assert abs(r1[key] - r2[key]) < 1e-4, key


@pytest.mark.slow
def test_ppo_two_processes_equal_one(base, monkeypatch):
    """Value head, GAE, whitening over the global batch, and the shipped 2 epochs × 2 minibatches:
    every rank cuts the global batch's permutation as one process does and keeps its own rows —
    here also in micro-batches of 3 sequences (ranks with fewer join with zero-gradient passes,
    and the gradient is all-reduced once per optimiser step all the same) and no-grad passes of 5."""
    extra = ["algo=ppo", "policy.steps=3"]
    probe = base / "grad_sync_ppo"
    micro = ("policy.micro_batch_size=3", "policy.forward_batch_size=5")
    micro += tuple(_grad_sync_probe(probe, monkeypatch))
    one_w, two_w, one, two = _policy_pair(base, "ppo", extra, micro)
    assert _max_diff(one_w, two_w) < TOL
    _assert_one_all_reduce_per_step(probe)  # micro-batches, zero-gradient joins included
    m1, m2 = _metrics(one, "policy"), _metrics(two, "policy")
    for key in ("train/kl", "train/reward", "ppo/value_loss", "ppo/clipfrac"):
        assert len(m1[key]) == len(m2[key]) == 3, key
        assert max(abs(a - b) for a, b in zip(m1[key], m2[key])) < TOL, key


def _grad_sync_probe(out_dir: Path, monkeypatch) -> list[str]:
    """Overrides that hang `tests/grad_sync_probe.py` (counts DDP's bucket all-reduces per
    backward pass, each rank into `out_dir/rank<r>.json`) on a run's Trainer."""
    # the probe imports as a top-level module (site-packages may hold a package named `tests`)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    return [
        "+callbacks.grad_sync._target_=grad_sync_probe.GradSyncProbe",
        f"+callbacks.grad_sync.out_dir={out_dir}",
    ]


def _assert_one_all_reduce_per_step(out_dir: Path) -> None:
    """Micro-batches accumulate locally (DDP no_sync) and only the last backward pass of a step
    all-reduces, the whole gradient once, on the same pass on both ranks."""
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    trained = ranks[0]["trained_elements"]
    for rank in ranks:
        steps = sum(b["steps"] for b in rank["batches"])
        assert steps >= 2
        for batch in rank["batches"]:
            assert batch["all_reduces"] == batch["steps"] >= 1
            assert batch["elements"] == batch["steps"] * trained  # the whole gradient, once
        backward = sum(b["backward"] for b in rank["batches"])
        assert backward >= 3 * steps  # micro-batches: the count is not 1 by construction
    assert [b["backward"] for b in ranks[0]["batches"]] == [
        b["backward"] for b in ranks[1]["batches"]
    ]


@pytest.mark.slow
def test_dpo_all_reduces_the_gradient_once_per_optimiser_step(base, monkeypatch):
    """The same count for DPO in micro-batches of 3 pairs (the reward model's and PPO's are
    counted in their two-process equality runs above)."""
    probe = base / "grad_sync_dpo"
    dpo = ["stage=dpo", "dpo.batch_size=16", "dpo.max_epochs=1", "dpo.micro_batch_size=3"]
    hook = _grad_sync_probe(probe, monkeypatch)
    _ok(train_cli([*BASE, *dpo, *DDP, f"hydra.run.dir={base}/dpo_sync", *hook], base))
    _assert_one_all_reduce_per_step(probe)


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


@pytest.mark.slow
def test_lora_policy_two_processes_equal_one(base):
    """Only the adapter is trained (and all-reduced); the reference is the adapter-free network."""
    extra = ["model.lora={r:4}", "policy.steps=3", "policy.optimizer.lr=1e-2"]
    one_w, two_w, one, two = _policy_pair(base, "lora", extra)
    assert _max_diff(one_w, two_w) < TOL
    sft = _weights(base / "artifacts" / "reviews" / "sft")
    assert _max_diff(one_w, sft) > 1e-4  # the merged adapter moved the policy
    m1, m2 = _metrics(one, "policy"), _metrics(two, "policy")
    for key in ("train/kl", "train/reward"):
        assert max(abs(a - b) for a, b in zip(m1[key], m2[key])) < TOL, key


@pytest.mark.slow
def test_ddp_policy_killed_and_resumed_equals_one_uninterrupted_process(base):
    """SIGKILL both ranks after a checkpoint; `ckpt_path=last` on 2 processes resumes the sampler
    position, β, the optimiser and the rollout count, and ends where one process does unbroken."""
    import os
    import signal
    import subprocess

    from test_faults import checkpoint_step, spawn, wait_for

    policy = [*BASE, "stage=policy", "policy.steps=6", "checkpoint.every_n_train_steps=2"]
    policy += ["kl_controller=adaptive"]
    runs = base / "resume"
    run_in_process(with_paths(compose(policy), base))  # one process, uninterrupted, here
    whole = _weights(base / "artifacts" / "reviews" / "policy")
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = [*policy, *DDP, f"hydra.run.dir={runs}/crash/first"]
    crashed = spawn(first, base, "slowpolicy:1.0", **quiet)
    last = wait_for("resume/crash/first/checkpoints/policy/last.ckpt", base, crashed)
    os.killpg(crashed.pid, signal.SIGKILL)  # rank zero and the rank it started
    assert crashed.wait(timeout=30) == -signal.SIGKILL
    assert checkpoint_step(last) < 6
    second = [*policy, *DDP, "ckpt_path=last", f"hydra.run.dir={runs}/crash/second"]
    resumed = _ok(train_cli(second, base))
    assert "[policy] resuming from" in resumed.stdout
    assert _max_diff(_weights(base / "artifacts" / "reviews" / "policy"), whole) < TOL
