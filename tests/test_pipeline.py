"""End to end: sft → rm → policy on the TINY config, each algorithm, and the saved policy reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose, train_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_lightning.errors import ArtifactError
from rlhf_lightning.run import run


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory) -> Path:
    """One short pipeline run whose artifacts the tests below reuse."""
    root = tmp_path_factory.mktemp("pipeline")
    run(compose(["stage=pipeline", *TINY], root))
    return root


@pytest.mark.slow
def test_pipeline_writes_every_artifact(pipeline_root: Path):
    for stage in ("sft", "rm", "policy", "tokenizer"):
        assert (pipeline_root / "artifacts" / "reviews" / stage / "config.json").exists() or (
            stage == "tokenizer"
        )
    manifest = json.loads(
        (pipeline_root / "artifacts/reviews/policy/rlhf_artifact.json").read_text()
    )
    # the policy records which reference and reward model it was trained against
    assert len(manifest["sft_sha256"]) == 64 and len(manifest["reward_sha256"]) == 64
    for key in ("proxy_reward", "kl", "gold_reward", "reference_gold_reward"):
        assert torch.isfinite(torch.tensor(manifest["metrics"][key]))


@pytest.mark.slow
def test_saved_policy_reloads_with_transformers_alone_and_generates(pipeline_root: Path):
    path = pipeline_root / "artifacts/reviews/policy"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = tokenizer(
        "review of the silent harbor :", return_tensors="pt", add_special_tokens=False
    )
    bos = torch.tensor([[tokenizer.bos_token_id]])
    ids = torch.cat([bos, prompt["input_ids"]], 1)
    out = model.generate(
        ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), str)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["algo=ppo", "kl.estimator=k3", "kl.penalty=sequence", "kl_controller=adaptive"],
        ["algo=grpo", "kl_controller=budget", "reward=gold"],
        ["algo=reinforce", "kl.estimator=k2", "reward=ensemble"],
    ],
    ids=["ppo-k3-sequence-adaptive", "grpo-budget-gold", "reinforce-k2-ensemble"],
)
def test_policy_stage_swaps(pipeline_root: Path, tmp_path: Path, overrides: list[str]):
    """Every algorithm, estimator, placement, controller and reward runs and logs its keys."""
    cfg = compose(["stage=policy", *overrides, *TINY], pipeline_root)
    cfg.paths.output_dir = str(tmp_path / "run")
    run(cfg)
    metrics = (tmp_path / "run" / "csv" / "policy" / "metrics.csv").read_text()
    keys = [
        "train/objective",
        "train/reward",
        "train/kl",
        "train/entropy",
        "train/beta",
        "train/response_length",
        "train/eos_rate",
    ]
    if "algo=ppo" in overrides:
        keys += ["ppo/clipfrac", "ppo/approx_kl", "ppo/value_loss"]
    for key in keys:
        assert key in metrics


def test_policy_stage_without_sft_artifact_names_the_command(tmp_path: Path):
    with pytest.raises(ArtifactError, match=r"python train.py stage=sft"):
        run(compose(["stage=policy", *TINY], tmp_path))


def test_policy_stage_without_rm_artifact_fails_in_one_line(tmp_path: Path):
    proc = train_cli(["stage=policy", *TINY], tmp_path)
    assert proc.returncode == 2
    assert "stage=sft" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
