"""Fault injection: crashes, bad input, numerical faults, bad configuration and unsafe files.

Each fault, and what must happen:
  crash mid-training (exception; SIGKILL) -> `ckpt_path=last` resumes to the same final weights,
      bitwise, and the same metrics (RM stage; policy stage; mid-epoch and at an epoch's end)
  kill while an artifact is written      -> the previous artifact stays intact and loadable; the
      stray hidden folder goes at the next successful save, a concurrent writer's never does
  malformed data (table below)           -> DataError, one line naming file, row and fix; exit 2
      through train.py; `data.on_bad_row=skip` skips, counts, prints the count and trains
      (random bytes and rows: tests/test_records_fuzz.py)
  NaN/inf loss                           -> NumericalError naming the quantity and the step, exit
      2, the last good checkpoint kept
  impossible configuration               -> fails before any work: the root folder stays empty
  unsafe files                           -> checkpoints load with weights_only=True (a pickle
      that runs code is refused), artifacts are safetensors, no trust_remote_code by default,
      wandb never prompts (stdin closed, WANDB_MODE unset)
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from helpers import HEAVY, OFFLINE_ENV, REPO, TINY, compose, train_cli, with_paths
from hydra.errors import ConfigCompositionException
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, open_dict

from rlhf_lightning.artifacts import (
    MANIFEST,
    _writing,
    atomic_directory,
    content_hash,
    read_manifest,
    remove_stale_versions,
    save_model_artifact,
)
from rlhf_lightning.context import RunContext
from rlhf_lightning.data.batching import LengthGroupedBatchSampler, trained_position
from rlhf_lightning.errors import ArtifactError, ConfigError, DataError, NumericalError
from rlhf_lightning.models.factory import ModelSpec
from rlhf_lightning.modules.policy import PolicyModule
from rlhf_lightning.modules.reward_model import RewardModelModule
from rlhf_lightning.resume import (
    RNGState,
    SafeCheckpointIO,
    resolve_checkpoints,
    rng_state,
    set_rng_state,
)
from rlhf_lightning.run import run

# 2 epochs of 8 steps (256 pairs / 32), a checkpoint every 2 steps
RM_RESUME = ["stage=rm", *TINY, "rm.max_epochs=2", "checkpoint.every_n_train_steps=2"]
ARTIFACT = Path("artifacts") / "reviews" / "rm"


def cfg_in(overrides: list[str], root: Path, run_name: str) -> DictConfig:
    """The config for `overrides` rooted at `root`, its run dir `root/outputs/<run_name>`."""
    cfg = with_paths(compose(overrides), root)
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "outputs" / run_name)
    return cfg


@contextlib.contextmanager
def crash_at(module_class, step: int):
    """`module_class.training_step` raises once the global step reaches `step` (a crash)."""
    original = module_class.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step >= step:
            raise RuntimeError(f"injected crash at step {self.global_step}")
        return original(self, batch, batch_idx)

    module_class.training_step = training_step
    try:
        yield
    finally:
        module_class.training_step = original


def step_losses(run_dir: Path, stage: str = "rm") -> dict[int, float]:
    with open(run_dir / "csv" / stage / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def checkpoint_step(path: Path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


# ---- which checkpoint `ckpt_path` means --------------------------------------------------------


def make_checkpoint(run_dir: Path, stage: str, mtime: float) -> Path:
    path = run_dir / "checkpoints" / stage / "last.ckpt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_last_finds_the_newest_sibling_run_with_a_checkpoint(tmp_path):
    runs = tmp_path / "outputs" / "rm"
    make_checkpoint(runs / "2024-01-01_10-00-00", "rm", 1_000)
    newer = make_checkpoint(runs / "2024-01-01_09-00-00", "rm", 2_000)  # name older, file newer
    make_checkpoint(runs / "2024-01-01_11-00-00", "sft", 3_000)  # another stage: not a candidate
    current = runs / "2024-01-01_12-00-00"
    current.mkdir()
    assert resolve_checkpoints("last", ["rm"], current) == {"rm": str(newer)}
    own = make_checkpoint(current, "rm", 500)  # hydra.run.dir=<old dir>: its own checkpoint wins
    assert resolve_checkpoints("last", ["rm"], current) == {"rm": str(own)}


def test_last_resumes_every_stage_of_a_pipeline_from_its_own_checkpoint(tmp_path):
    old = tmp_path / "outputs" / "pipeline" / "old"
    sft, rm = make_checkpoint(old, "sft", 1_000), make_checkpoint(old, "rm", 1_001)
    found = resolve_checkpoints("last", ["sft", "rm", "policy"], old.parent / "new")
    assert found == {"sft": str(sft), "rm": str(rm)}  # policy had not started: it starts afresh
    assert resolve_checkpoints(str(old), ["sft", "rm", "policy"], tmp_path / "x") == found


def test_checkpoint_null_writes_no_checkpoint_and_still_saves_the_artifact(tmp_path):
    """`checkpoint=null` (a SmolLM2 stage's last.ckpt is 1.6 GB): the run trains and saves its
    artifact, and leaves no checkpoints/ behind."""
    accuracy = run(cfg_in(["stage=rm", *TINY, "checkpoint=null"], tmp_path, "run"))
    assert (tmp_path / ARTIFACT / "model.safetensors").exists()
    assert accuracy > 0.5
    assert not (tmp_path / "outputs" / "run" / "checkpoints").exists()


def test_multirun_jobs_only_resume_from_their_own_directory(tmp_path):
    make_checkpoint(tmp_path / "sweep" / "0", "policy", 1_000)
    with pytest.raises(ConfigError, match="ckpt_path=last"):
        resolve_checkpoints("last", ["policy"], tmp_path / "sweep" / "1", siblings=False)


@pytest.mark.parametrize(
    ("ckpt_path", "stages", "named"),
    [
        ("last", ["rm"], "no checkpoints/<stage>/last.ckpt"),
        ("{root}/nowhere.ckpt", ["rm"], "does not exist"),
        ("{root}/file.ckpt", ["sft", "rm"], "one checkpoint file"),
        ("{root}", ["rm"], "holds no checkpoints"),
        ("", ["rm"], "is invalid"),
    ],
)
def test_a_wrong_ckpt_path_fails_in_one_line(ckpt_path, stages, named, tmp_path):
    (tmp_path / "file.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError) as err:
        resolve_checkpoints(ckpt_path.format(root=tmp_path), stages, tmp_path / "run")
    assert named in str(err.value) and " — fix: " in str(err.value) and "\n" not in str(err.value)


def test_an_explicit_file_or_stage_folder_resumes_a_single_stage(tmp_path):
    path = make_checkpoint(tmp_path / "old", "rm", 1_000)
    assert resolve_checkpoints(str(path), ["rm"], tmp_path / "run") == {"rm": str(path)}
    assert resolve_checkpoints(str(path.parent), ["rm"], tmp_path / "run") == {"rm": str(path)}
    assert resolve_checkpoints(None, ["rm"], tmp_path / "run") == {}


# ---- what a checkpoint carries -----------------------------------------------------------------


def test_sampler_position_is_the_trainers_count_not_the_loaders():
    """A loader with workers runs ahead: the saved position is what training has processed."""
    lengths = [i % 7 for i in range(40)]
    ahead = LengthGroupedBatchSampler(lengths, 4, seed=3)
    batches = iter(ahead)
    for _ in range(6):  # the loader drew 6 batches of epoch 0 ...
        next(batches)
    progress = SimpleNamespace(current=SimpleNamespace(processed=4))  # ... training used 4
    trainer = SimpleNamespace(
        current_epoch=0,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )
    state = trained_position(trainer, ahead)
    assert state == {"epoch": 0, "consumed": 4} and ahead.state_dict()["consumed"] == 6
    resumed = LengthGroupedBatchSampler(lengths, 4, seed=3)
    resumed.load_state_dict(state)
    whole = list(LengthGroupedBatchSampler(lengths, 4, seed=3))  # epoch 0, uninterrupted
    assert list(resumed) == whole[4:]
    uninterrupted = LengthGroupedBatchSampler(lengths, 4, seed=3)
    list(uninterrupted)
    assert list(resumed) == list(uninterrupted) != whole  # epoch 1 alike, and reshuffled


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_stage_trainers_restore_rng_first_and_load_safely(tiny_cfg):
    trainer = RunContext(tiny_cfg).trainer("rm")
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
    ours = [c for c in trainer.callbacks if type(c).__module__.startswith("rlhf_lightning")]
    assert isinstance(ours[0], RNGState)
    checkpoint = trainer.checkpoint_callback
    assert checkpoint.dirpath == str(Path(tiny_cfg.paths.output_dir) / "checkpoints" / "rm")


# ---- resume: the same run, uninterrupted or crashed and resumed ---------------------------------


@pytest.fixture(scope="module")
def rm_whole(tiny_cfg_base, tmp_path_factory) -> Path:
    """An uninterrupted RM run with RM_RESUME: its root folder."""
    root = tmp_path_factory.mktemp("rm_whole")
    run(cfg_in(RM_RESUME, root, "whole"))
    return root


@pytest.mark.slow
def test_rm_in_micro_batches_resumes_exactly_after_a_crash(tmp_path):
    """A step is one training_step however many micro-batches it has: a crashed micro-batched run
    resumes to the bitwise weights of the same run uninterrupted."""
    micro = [*RM_RESUME, "rm.micro_batch_size=3"]
    run(cfg_in(micro, tmp_path / "whole", "whole"))
    with crash_at(RewardModelModule, 5), pytest.raises(RuntimeError, match="injected"):
        run(cfg_in(micro, tmp_path, "crashed"))
    run(cfg_in([*micro, "ckpt_path=last"], tmp_path, "resumed"))
    assert content_hash(tmp_path / ARTIFACT) == content_hash(tmp_path / "whole" / ARTIFACT)


@pytest.mark.parametrize("crash", [5, 9], ids=["mid-epoch", "after-an-epoch-end-checkpoint"])
def test_rm_resumes_exactly_after_a_crash(rm_whole, crash, tmp_path):
    """Checkpoints at steps 4 / 8 (the last batch of epoch 0, before its validation)."""
    with crash_at(RewardModelModule, crash), pytest.raises(RuntimeError, match="injected"):
        run(cfg_in(RM_RESUME, tmp_path, "crashed"))
    last = tmp_path / "outputs" / "crashed" / "checkpoints" / "rm" / "last.ckpt"
    assert checkpoint_step(last) == crash - 1
    assert not (tmp_path / ARTIFACT).exists()
    run(cfg_in([*RM_RESUME, "ckpt_path=last"], tmp_path, "resumed"))
    assert content_hash(tmp_path / ARTIFACT) == content_hash(rm_whole / ARTIFACT)  # bitwise
    assert read_manifest(tmp_path / ARTIFACT) == read_manifest(rm_whole / ARTIFACT)  # metrics
    whole = step_losses(rm_whole / "outputs" / "whole")
    resumed = step_losses(tmp_path / "outputs" / "resumed")
    assert min(resumed) == crash - 1 and resumed == {s: whole[s] for s in resumed}  # same batches


def test_rm_keep_best_resumed_in_a_new_run_keeps_the_earlier_best(tmp_path):
    """rm.keep=best, crashed after its best validation (step 24 of 48, as in test_rm_stage) and
    resumed with `ckpt_path=last` in a new run dir: the later, worse validations do not replace
    the crashed run's best.ckpt, so the artifact is the uninterrupted run's, bitwise."""
    keep = [*RM_RESUME, "rm.max_epochs=6", "rm.keep=best"]
    run(cfg_in(keep, tmp_path / "whole", "whole"))
    whole = read_manifest(tmp_path / "whole" / ARTIFACT)
    assert whole["kept"]["step"] < 29 < whole["kept"]["steps"], whole["kept"]  # crash after it
    with crash_at(RewardModelModule, 29), pytest.raises(RuntimeError, match="injected"):
        run(cfg_in(keep, tmp_path, "crashed"))
    run(cfg_in([*keep, "ckpt_path=last"], tmp_path, "resumed"))
    assert content_hash(tmp_path / ARTIFACT) == content_hash(tmp_path / "whole" / ARTIFACT)
    assert read_manifest(tmp_path / ARTIFACT) == whole
    assert not (tmp_path / "outputs" / "resumed" / "checkpoints" / "rm" / "best.ckpt").exists()


INJECT = """
import os, sys, time
from rlhf_lightning.modules.reward_model import RewardModelModule as M
fault, arg = os.environ["RLHF_FAULT"].split(":")
if fault == "slow":  # each step takes a while: the test kills mid-training
    def on_train_batch_end(self, outputs, batch, batch_idx):
        time.sleep(float(arg))
    M.on_train_batch_end = on_train_batch_end
elif fault == "slowpolicy":  # each policy step takes a while: the test kills mid-training
    from rlhf_lightning.modules.policy import PolicyModule
    def on_train_batch_end(self, outputs, batch, batch_idx):
        time.sleep(float(arg))
    PolicyModule.on_train_batch_end = on_train_batch_end
elif fault == "nan":  # the chosen rewards turn NaN at one step
    score = M._score_pairs
    def _score_pairs(self, batch):
        chosen, rejected = score(self, batch)
        if self.training and self.global_step == int(arg):
            chosen = chosen * float("nan")
        return chosen, rejected
    M._score_pairs = _score_pairs
import runpy
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def spawn(args: list[str], root: Path, fault: str, **kwargs) -> subprocess.Popen:
    """`train.py <args>` with a fault injected (see INJECT), in the background."""
    script = root / "inject.py"
    root.mkdir(parents=True, exist_ok=True)
    script.write_text(INJECT)
    env = {**os.environ, **OFFLINE_ENV, "RLHF_FAULT": fault, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(script), *args, f"paths.root_dir={root}"],
        cwd=REPO,
        env=env,
        text=True,
        **kwargs,
    )


def wait_for(pattern: str, root: Path, process: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        assert process.poll() is None, f"train.py ended ({process.returncode}) before {pattern}"
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no {pattern} after {timeout} s")


@pytest.mark.slow  # two train.py subprocesses
def test_rm_killed_with_sigkill_resumes_to_the_same_weights(rm_whole, tmp_path):
    crashed = spawn(
        RM_RESUME, tmp_path, "slow:0.3", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = wait_for("outputs/rm/*/checkpoints/rm/last.ckpt", tmp_path, crashed)
    crashed.send_signal(signal.SIGKILL)
    assert crashed.wait(timeout=30) == -signal.SIGKILL
    assert checkpoint_step(last) < 16  # killed mid-training ...
    assert not (tmp_path / ARTIFACT).exists()  # ... before the artifact was saved
    time.sleep(1.0)  # a new second: the resumed run gets a new Hydra run dir
    result = train_cli([*RM_RESUME, "ckpt_path=last"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[rm] resuming from {last}" in result.stdout
    assert content_hash(tmp_path / ARTIFACT) == content_hash(rm_whole / ARTIFACT)
    assert read_manifest(tmp_path / ARTIFACT) == read_manifest(rm_whole / ARTIFACT)


def test_policy_resumes_exactly_after_a_crash(tiny_cfg_base, tmp_path):
    """RNG state (sampling), prompt-stream position, optimiser and β all come back."""
    run(with_paths(compose(["stage=sft", *TINY]), tmp_path))
    policy = [
        "stage=policy",
        *TINY,
        "reward=gold",
        "policy.steps=4",
        "checkpoint.every_n_train_steps=2",
    ]
    artifact = tmp_path / "artifacts" / "reviews" / "policy"
    whole = run(cfg_in(policy, tmp_path, "whole"))
    whole_hash = content_hash(artifact)
    whole_manifest = read_manifest(artifact)
    with crash_at(PolicyModule, 3), pytest.raises(RuntimeError, match="injected"):
        run(cfg_in(policy, tmp_path, "crashed"))
    assert checkpoint_step(tmp_path / "outputs/crashed/checkpoints/policy/last.ckpt") == 2
    resumed = run(cfg_in([*policy, "ckpt_path=last"], tmp_path, "resumed"))
    assert content_hash(artifact) == whole_hash
    assert resumed == whole  # the objective r − β·KL of the final evaluation
    assert read_manifest(artifact) == whole_manifest


@pytest.mark.slow  # two train.py subprocesses
def test_policy_killed_with_sigkill_resumes_to_the_same_weights(tiny_cfg_base, tmp_path):
    """SIGKILL mid-training, `ckpt_path=last` in a new run: the same policy as an uninterrupted run."""
    run(with_paths(compose(["stage=sft", *TINY]), tmp_path))
    policy = [
        "stage=policy",
        *TINY,
        "reward=gold",
        "policy.steps=6",
        "checkpoint.every_n_train_steps=2",
    ]
    artifact = tmp_path / "artifacts" / "reviews" / "policy"
    runs = tmp_path / "outputs"
    whole = train_cli([*policy, f"hydra.run.dir={runs}/whole/run"], tmp_path, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    whole_hash, whole_manifest = content_hash(artifact), read_manifest(artifact)
    crashed = spawn(
        [*policy, f"hydra.run.dir={runs}/crash/first"],
        tmp_path,
        "slowpolicy:1.0",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = wait_for("outputs/crash/first/checkpoints/policy/last.ckpt", tmp_path, crashed)
    crashed.send_signal(signal.SIGKILL)
    assert crashed.wait(timeout=30) == -signal.SIGKILL
    assert checkpoint_step(last) < 6  # killed mid-training
    # a new run beside the killed one: `last` finds the killed run's checkpoint
    resumed = [*policy, "ckpt_path=last", f"hydra.run.dir={runs}/crash/second"]
    result = train_cli(resumed, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[policy] resuming from" in result.stdout
    assert content_hash(artifact) == whole_hash  # bitwise
    assert read_manifest(artifact) == whole_manifest


# ---- atomic artifacts ---------------------------------------------------------------------------

SLOW_SAVE = """
import pathlib, sys, time
from rlhf_lightning.artifacts import save_model_artifact

class SlowModel:  # writes part of its weights, then hangs: the test kills it mid-write
    def save_pretrained(self, directory, safe_serialization=True):
        with open(pathlib.Path(directory) / "model.safetensors", "wb") as f:
            f.write(b"half a model")
        print("writing", flush=True)
        time.sleep(120)

class Tokenizer:
    def save_pretrained(self, directory):
        pass

save_model_artifact(SlowModel(), Tokenizer(), pathlib.Path(sys.argv[1]), {"stage": "rm"})
"""


def tiny_reward_model(seed: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_lightning.models.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=300,
        num_labels=1,
        pad_token_id=0,
    )
    tokenizer = build_tokenizer(["the plot was good .", "the plot was bad ."] * 4, 300)
    return LlamaForSequenceClassification(config), tokenizer


def test_a_kill_while_saving_leaves_the_previous_artifact(tmp_path):
    from transformers import AutoModelForSequenceClassification

    target = tmp_path / "artifacts" / "reviews" / "rm"
    model, tokenizer = tiny_reward_model(0)
    first = save_model_artifact(model, tokenizer, target, {"stage": "rm"})
    writer = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(target)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL
    strays = [p for p in target.parent.iterdir() if p.name.startswith(".rm-") and p.is_dir()]
    assert len(strays) == 2  # the live version and the half-written one
    assert content_hash(target) == first == read_manifest(target)["sha256"]
    loaded = AutoModelForSequenceClassification.from_pretrained(target)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    second = save_model_artifact(*tiny_reward_model(1), target, {"stage": "rm"})
    hidden = sorted(p.name for p in target.parent.iterdir() if p.name.startswith("."))
    assert hidden == [target.resolve().name]  # stray and old version gone, no lock files left
    assert content_hash(target) == second != first


def test_cleanup_never_touches_a_version_being_written(tmp_path):
    target = tmp_path / "rm"
    with atomic_directory(target) as live:
        (live / "model.safetensors").write_bytes(b"w")
    busy = tmp_path / ".rm-20240101-000000-0123abcd"
    with _writing(busy):  # a concurrent run (another sweep job) is writing this version
        busy.mkdir()
        assert remove_stale_versions(target) == []
        assert busy.is_dir() and target.resolve() == live.resolve()
    assert remove_stale_versions(target) == [busy]  # its writer gone without finishing: a stray


# ---- bad data -----------------------------------------------------------------------------------


def good_rows(n: int = 40) -> list[bytes]:
    words = [("great", "awful"), ("good", "bad"), ("fine", "dull"), ("superb", "boring")]
    rows = []
    for i in range(n):
        good, bad = words[i % len(words)]
        row = {
            "prompt": f"review of film {i} :",
            "chosen": f" the plot was {good} .",
            "rejected": f" the plot was {bad} .",
        }
        rows.append(json.dumps(row).encode() + b"\n")
    return rows


def pair(**fields) -> bytes:
    row = {"prompt": "review of it :", "chosen": " good .", "rejected": " bad .", **fields}
    return json.dumps({k: v for k, v in row.items() if v is not ...}).encode() + b"\n"


BAD_ROWS = [  # (id, row 3 of the file, extra overrides, what the message says)
    ("invalid-json", b'{"prompt": "a", "chosen": " b",\n', [], "is not valid JSON"),
    ("missing-field", pair(rejected=...), [], "missing 'rejected'"),
    ("extra-field", pair(score=1), [], "unknown field 'score'"),
    ("wrong-type", pair(chosen=3), [], "'chosen' must be a string, got a number"),
    ("null", pair(rejected=None), [], "'rejected' must be a string, got null"),
    ("empty-string", pair(chosen=""), [], "'chosen' is empty"),
    ("whitespace-only", pair(rejected="  \t"), [], "'rejected' is empty"),
    ("chosen-equals-rejected", pair(rejected=" good ."), [], "identical"),
    ("not-an-object", b"[1, 2]\n", [], "is a list, not an object"),
    (
        "non-utf8",
        b'{"prompt": "caf\xe9 :", "chosen": " a .", "rejected": " b ."}\n',
        [],
        "is not valid UTF-8",
    ),
    ("margin-nan", pair(margin="nan"), [], "'margin' must be finite"),
    ("over-max-chars", pair(chosen=" good" * 40), ["data.max_chars=80"], "more than max_chars=80"),
]


def jsonl_cfg(path: Path, root: Path, extra: list[str] = ()) -> DictConfig:
    return with_paths(compose(["stage=rm", *TINY, "data=jsonl", f"data.path={path}", *extra]), root)


def one_line_naming(message: str, path: Path, row: int | None) -> None:
    assert "\n" not in message, message
    where = f"{path}:row {row}: " if row is not None else f"{path}: "
    assert message.startswith(where) and " — fix: " in message, message


@pytest.mark.parametrize(
    ("line", "extra", "says"), [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS]
)
def test_a_bad_row_stops_the_run_naming_file_row_and_fix(line, extra, says, tmp_path):
    rows = good_rows()
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b"".join(rows[:2] + [line] + rows[2:]))
    with pytest.raises(DataError) as err:
        run(jsonl_cfg(path, tmp_path, extra))
    one_line_naming(str(err.value), path, 3)
    assert says in str(err.value)
    assert not (tmp_path / "artifacts").exists()
    result = json.loads((tmp_path / "run" / "result.json").read_text())  # the run's record
    assert result["status"] == "failed" and result["error"] == f"DataError: {err.value}"


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"", "contains no rows"), (b"\n \n", "contains no rows"), (None, "does not exist")],
    ids=["empty-file", "blank-lines", "missing-file"],
)
def test_an_unusable_file_stops_the_run_naming_it(content, says, tmp_path):
    path = tmp_path / "prefs.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        run(jsonl_cfg(path, tmp_path))
    one_line_naming(str(err.value), path, None)
    assert says in str(err.value)
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.slow  # train.py subprocesses
@pytest.mark.parametrize("case", ["invalid-json", "missing-file"])
def test_bad_data_through_train_py_exits_2_with_one_line(case, tmp_path):
    path = tmp_path / "prefs.jsonl"
    if case == "invalid-json":
        rows = good_rows()
        path.write_bytes(b"".join(rows[:2] + [b'{"prompt": \n'] + rows[2:]))
    result = train_cli(["stage=rm", *TINY, "data=jsonl", f"data.path={path}"], tmp_path, 120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    one_line_naming(lines[0].removeprefix("error: "), path, 3 if case == "invalid-json" else None)
    assert not (tmp_path / "artifacts").exists()


@pytest.fixture(scope="module")
def skip_run(tiny_cfg_base, tmp_path_factory):
    """`data.on_bad_row=skip` over a file with four bad rows: (root, file, printed output)."""
    root = tmp_path_factory.mktemp("skip")
    rows = good_rows()
    bad = [b"{oops\n", pair(rejected=...), b'{"chosen": "\xff"}\n', pair(rejected=" good .")]
    path = root / "prefs.jsonl"
    path.write_bytes(b"".join(rows[:2] + bad[:2] + rows[2:20] + bad[2:] + rows[20:]))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run(jsonl_cfg(path, root, ["data.on_bad_row=skip"]))
    return root, path, out.getvalue()


def test_skipped_rows_are_counted_reported_and_the_model_trains(skip_run):
    root, path, printed = skip_run
    reports = [line for line in printed.splitlines() if line.startswith("[data]")]
    assert len(reports) == 1, printed  # once, for the file (not again per split or stage)
    assert "skipped 4 bad rows" in reports[0]
    assert f"(first: {path}:row 3: is not valid JSON" in reports[0]
    artifact = root / "artifacts" / "custom" / "rm"
    manifest = read_manifest(artifact)
    assert manifest["stage"] == "rm" and math.isfinite(manifest["metrics"]["val/loss"])


# ---- numerical faults ---------------------------------------------------------------------------


@pytest.mark.slow  # a train.py subprocess
def test_a_nan_loss_exits_2_naming_quantity_and_step_and_keeps_the_checkpoint(tmp_path):
    args = ["stage=rm", *TINY, "checkpoint.every_n_train_steps=2"]
    process = spawn(args, tmp_path, "nan:3", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert errors[0].startswith("error: train/loss (Bradley–Terry) is nan at step 3;")
    assert "last good checkpoint is kept" in errors[0]
    (last,) = tmp_path.glob("outputs/rm/*/checkpoints/rm/last.ckpt")
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    result = json.loads((last.parents[2] / "result.json").read_text())
    assert result["status"] == "failed" and "NumericalError" in result["error"]
    assert not (tmp_path / ARTIFACT).exists()


def test_a_diverging_learning_rate_stops_with_numerical_error(tiny_cfg, tmp_path):
    with open_dict(tiny_cfg):
        tiny_cfg.rm.module.optimizer.lr = 1e30
        tiny_cfg.rm.module.scheduler = None  # warm-up would hide the step
    with pytest.raises(NumericalError) as err:
        run(tiny_cfg)
    message = str(err.value)
    assert message.startswith("train/loss (Bradley–Terry) is ") and " at step " in message
    step = int(message.split(" at step ")[1].split(";")[0])
    assert 1 <= step < 8 and "\n" not in message
    assert not (tmp_path / ARTIFACT).exists()


# ---- configuration ------------------------------------------------------------------------------

BAD_CONFIG = [
    ["rm.module.optimizer.lr=-1e-3"],
    ["rm.batch_size=abc"],
    ["rm.max_length=2.5"],
    ["data.on_bad_row=maybe"],
    ["data.max_chars=0"],
    ["ckpt_path=/nowhere/last.ckpt"],
    ["ckpt_path=last"],  # nothing to resume
]


@pytest.mark.parametrize("overrides", BAD_CONFIG, ids=[o[0] for o in BAD_CONFIG])
def test_a_bad_value_fails_before_anything_is_written(overrides, tmp_path):
    cfg = with_paths(compose(["stage=rm", *TINY, *overrides]), tmp_path)
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert overrides[0].split("=")[0] in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no data, no artifacts, no run dir


@pytest.mark.parametrize("override", ["rm.bogus=1", "checkpoint.every_n_step=2", "seeed=1"])
def test_an_unknown_key_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].split(".")[-1]):
        compose(["stage=rm", override])


@pytest.mark.slow  # a train.py subprocess
@pytest.mark.parametrize(
    "run", [["stage=rm", *TINY], ["experiment=smollm2_rm"]], ids=["tiny", "recipe"]
)
def test_a_wrong_type_through_train_py_writes_nothing(run, tmp_path):
    """...and fails before torch, transformers or Lightning are imported (here they cannot be): a
    mistyped value costs a second or two, not the ~10 s their imports take — in a recipe too, whose
    `${bf16_if_native:…}` precision is not resolved to check it."""
    args = [*run, "rm.batch_size=abc"]
    result = train_cli(args, tmp_path, timeout=120, without=HEAVY)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == "error: rm.batch_size='abc' is invalid: expected an integer > 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # no data, no artifacts
    (run_dir,) = (tmp_path / "outputs" / "rm").iterdir()
    assert {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}  # Hydra's own records


# ---- security -----------------------------------------------------------------------------------


def unsafe_calls(source: str) -> list[str]:
    """Calls that can unpickle code: torch.load without weights_only=True, pickle/dill loads,
    and trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        safe = isinstance(keywords.get("weights_only"), ast.Constant) and (
            keywords["weights_only"].value is True
        )
        if name.endswith("torch.load") and not safe:
            found.append(ast.unparse(node))
        if name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads"):
            found.append(ast.unparse(node))
        remote = keywords.get("trust_remote_code")
        if isinstance(remote, ast.Constant) and remote.value is True:
            found.append(ast.unparse(node))
    return found


def test_nothing_in_the_package_unpickles_code():
    assert unsafe_calls("torch.load(f)\ntorch.load(f, weights_only=False)") == [
        "torch.load(f)",
        "torch.load(f, weights_only=False)",
    ]
    assert unsafe_calls("torch.load(f, weights_only=True)") == []  # the checker can tell
    files = sorted((REPO / "rlhf_lightning").rglob("*.py"))
    assert len(files) > 20
    found = {str(f.relative_to(REPO)): unsafe_calls(f.read_text()) for f in files}
    assert {f: calls for f, calls in found.items() if calls} == {}


def test_artifacts_are_safetensors_only(skip_run):
    artifact = skip_run[0] / "artifacts" / "custom" / "rm"
    names = {p.name for p in artifact.iterdir()}
    assert "model.safetensors" in names and MANIFEST in names
    pickled = {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}
    assert pickled == set()


def test_remote_code_is_off_by_default():
    for path in sorted((REPO / "conf" / "model").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["trust_remote_code"] is False, path.name
    assert ModelSpec().trust_remote_code is False
    assert compose(["model=hf", "model.name_or_path=x"]).model.trust_remote_code is False


class RunsCode:
    """Unpickling this object calls open(marker, "w"): what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker, path = tmp_path / "code-ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # the danger is real: a plain load runs the code ...
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    for asked in (None, False):  # whatever the caller asks for
        with pytest.raises(ArtifactError) as err:
            SafeCheckpointIO().load_checkpoint(path, weights_only=asked)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert not marker.exists()  # ... ours never does


def test_the_refusal_does_not_rely_on_torch_defaults(tmp_path, monkeypatch):
    """Lightning 2.6 calls torch.load(weights_only=None): torch >= 2.6 reads that as True, older
    torch (pyproject allows >= 2.4) and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 as False."""
    path, marker = malicious_checkpoint(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        TorchCheckpointIO().load_checkpoint(path)  # Lightning's own checkpoint IO runs the code
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ArtifactError):
        SafeCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


def test_resuming_from_a_malicious_checkpoint_fails_without_running_it(tiny_cfg, tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    with open_dict(tiny_cfg):
        tiny_cfg.ckpt_path = str(path)
    with pytest.raises(ArtifactError, match="holds pickled objects"):
        run(tiny_cfg)
    assert not marker.exists() and not (tmp_path / ARTIFACT).exists()


def test_a_truncated_checkpoint_fails_in_one_line(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ArtifactError, match="cannot read checkpoint") as err:
        SafeCheckpointIO().load_checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.slow  # a train.py subprocess
def test_wandb_never_prompts_with_stdin_closed(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({k: v for k, v in OFFLINE_ENV.items() if not k.startswith("WANDB_")})
    env["WANDB_CONFIG_DIR"] = str(tmp_path / "wandb-config")  # no settings or login of this host
    args = [a for a in TINY if not a.startswith("logger=")]
    result = subprocess.run(
        [sys.executable, "train.py", "stage=rm", *args, f"paths.root_dir={tmp_path}"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("outputs/rm/*/wandb/offline-run-*"))  # offline by default
    assert "api key" not in (result.stdout + result.stderr).lower()
