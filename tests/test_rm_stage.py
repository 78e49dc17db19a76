"""End-to-end `stage=rm` on the TINY config: the artifact, its reload by transformers alone, the
validation metrics recomputed from it, determinism, and the `train.py` command line."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, train_cli, with_paths
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_lightning.artifacts import MANIFEST, content_hash
from rlhf_lightning.context import RunContext
from rlhf_lightning.data.encoding import encode_prompt, encode_response
from rlhf_lightning.rewards.learned import LearnedReward
from rlhf_lightning.run import run

VAL_KEYS = (
    "val/loss",
    "val/accuracy",
    "val/margin",
    "val/reward_chosen",
    "val/reward_rejected",
    "val/bayes_accuracy",
)


@pytest.fixture(scope="module")
def rm_run(tiny_cfg_base, tmp_path_factory):
    """One TINY reward-model run shared by this module: (cfg, returned metric, artifact dir)."""
    cfg = with_paths(tiny_cfg_base, tmp_path_factory.mktemp("rm_run"))
    accuracy = run(cfg)
    return cfg, accuracy, Path(cfg.paths.artifacts_dir) / "reviews" / "rm"


def transformers_scores(artifact: Path, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Scores as a user gets them with transformers alone: tokenizer(prompt + response)."""
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    model = AutoModelForSequenceClassification.from_pretrained(artifact).eval()
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[:, 0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_artifact_holds_model_tokenizer_and_manifest(rm_run):
    cfg, accuracy, artifact = rm_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (artifact / name).is_file(), name
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert manifest["stage"] == "rm"
    assert manifest["sha256"] == content_hash(artifact)
    stats = manifest["reward_stats"]
    assert math.isfinite(stats["mean"]) and stats["std"] > 0
    metrics = manifest["metrics"]
    assert all(math.isfinite(metrics[key]) for key in VAL_KEYS)
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    assert accuracy == pytest.approx(metrics["val/accuracy"])  # what run() hands a sweeper
    card = json.loads((Path(cfg.paths.data_dir) / "reviews" / "card.json").read_text())
    assert metrics["val/bayes_accuracy"] == pytest.approx(card["bayes_accuracy"]["val"], abs=1e-6)
    assert AutoConfig.from_pretrained(artifact).num_labels == 1  # a scalar-head classifier


def test_transformers_alone_scores_like_the_framework(rm_run):
    cfg, _, artifact = rm_run
    rows = read_jsonl(Path(cfg.paths.data_dir) / "reviews" / "prefs_val.jsonl")[:4]
    prompts = [r["prompt"] for r in rows] * 2 + ["review of it :"]
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows] + [" great great ."]
    reward = LearnedReward(path=str(artifact)).setup(RunContext(cfg))
    expected = reward.raw(prompts, responses)  # [9], the framework's own encoding
    alone = transformers_scores(artifact, prompts, responses)
    torch.testing.assert_close(alone, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0  # different texts score differently: the test can tell them apart
    stats = json.loads((artifact / MANIFEST).read_text())["reward_stats"]
    normalised = (expected - stats["mean"]) / stats["std"]
    torch.testing.assert_close(reward(prompts, responses), normalised, atol=1e-5, rtol=1e-5)
    # The same ids: `<s> prompt response </s>` either way.
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    for prompt, response in zip(prompts, responses, strict=True):
        ours = encode_prompt(tokenizer, prompt) + encode_response(tokenizer, response)
        assert tokenizer(prompt + response)["input_ids"] == ours


def test_validation_metrics_recomputed_from_the_artifact(rm_run):
    """val/* logged during training = the saved model's scores on prefs_val.jsonl (max_length 128
    truncates none of the tiny task's pairs)."""
    cfg, _, artifact = rm_run
    assert_manifest_metrics_are_the_artifacts(cfg, artifact)


def assert_manifest_metrics_are_the_artifacts(cfg, artifact: Path) -> None:
    """The manifest's val/* and reward statistics = the saved model's scores on prefs_val.jsonl."""
    rows = read_jsonl(Path(cfg.paths.data_dir) / "reviews" / "prefs_val.jsonl")
    prompts = [r["prompt"] for r in rows]
    chosen = transformers_scores(artifact, prompts, [r["chosen"] for r in rows])
    rejected = transformers_scores(artifact, prompts, [r["rejected"] for r in rows])
    manifest = json.loads((artifact / MANIFEST).read_text())
    metrics, stats = manifest["metrics"], manifest["reward_stats"]
    both = torch.cat([chosen, rejected])
    recomputed = {
        "val/accuracy": (chosen > rejected).float().mean(),
        "val/loss": -F.logsigmoid(chosen - rejected).mean(),
        "val/margin": (chosen - rejected).mean(),
        "val/reward_chosen": chosen.mean(),
        "val/reward_rejected": rejected.mean(),
    }
    for key, value in recomputed.items():
        assert metrics[key] == pytest.approx(float(value), abs=1e-5), key
    assert stats["mean"] == pytest.approx(float(both.mean()), abs=1e-5)
    assert stats["std"] == pytest.approx(float(both.std(unbiased=False)), abs=1e-5)


def logged_validations(cfg) -> list[dict]:
    """The val/* rows of the run's CSV log, in order."""
    with open(Path(cfg.paths.output_dir) / "csv" / "rm" / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("val/loss")]


def test_keep_best_saves_the_weights_of_the_best_validation(tiny_cfg):
    """rm.keep=best: of six validations the artifact holds the one with the lowest val/loss (here
    not the last: lr 1e-3 for six epochs overfits the 256 pairs), validated again — its manifest
    metrics are the saved model's own scores — and the manifest names its step. The logged
    curve stays training's (no row for the re-validation); last.ckpt keeps best.ckpt's path and
    score for a resumed run."""
    cfg = tiny_cfg.copy()
    cfg.rm.max_epochs, cfg.rm.keep = 6, "best"
    run(cfg)
    artifact = Path(cfg.paths.artifacts_dir) / "reviews" / "rm"
    manifest = json.loads((artifact / MANIFEST).read_text())
    logged = logged_validations(cfg)
    losses = [float(row["val/loss"]) for row in logged]
    assert len(losses) == 6  # one per epoch, none for the re-validation
    best = min(range(6), key=losses.__getitem__)
    assert best != 5, losses  # the case keep=best exists for: the last is not the best
    per_epoch = math.ceil(256 / 32)
    kept = manifest["kept"]
    assert kept == {
        "weights": "best",
        "monitor": "val/loss",
        "score": pytest.approx(losses[best], abs=1e-6),
        "step": (best + 1) * per_epoch,
        "steps": 6 * per_epoch,
    }
    assert manifest["metrics"]["val/loss"] == pytest.approx(losses[best], abs=1e-5)
    assert manifest["metrics"]["val/accuracy"] == pytest.approx(float(logged[best]["val/accuracy"]))
    assert_manifest_metrics_are_the_artifacts(cfg, artifact)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints" / "rm"
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    (keeper,) = [v for k, v in state["callbacks"].items() if "'monitor': 'val/loss'" in k]
    assert Path(keeper["best_model_path"]) == checkpoints / "best.ckpt"
    assert float(keeper["best_model_score"]) == pytest.approx(losses[best], abs=1e-6)


def test_keep_best_monitors_accuracy_upwards(tiny_cfg):
    """rm.monitor=val/accuracy keeps the first validation with the highest accuracy."""
    cfg = tiny_cfg.copy()
    cfg.rm.max_epochs, cfg.rm.keep, cfg.rm.monitor = 3, "best", "val/accuracy"
    run(cfg)
    accuracies = [float(row["val/accuracy"]) for row in logged_validations(cfg)]
    manifest = json.loads((Path(cfg.paths.artifacts_dir) / "reviews" / "rm" / MANIFEST).read_text())
    first_best = accuracies.index(max(accuracies))
    assert manifest["kept"]["step"] == (first_best + 1) * math.ceil(256 / 32)
    assert manifest["metrics"]["val/accuracy"] == pytest.approx(max(accuracies))


def test_training_loss_logged_every_step(rm_run):
    cfg, _, _ = rm_run
    with open(Path(cfg.paths.output_dir) / "csv" / "rm" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == math.ceil(256 / 32)  # task.n_pairs_train / rm.batch_size, one epoch
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]


def test_same_seed_same_weights(rm_run, tiny_cfg):
    """A second run from scratch (data, tokenizer, model) with the same seed: identical weights."""
    _, _, first = rm_run
    run(tiny_cfg)
    second = Path(tiny_cfg.paths.artifacts_dir) / "reviews" / "rm"
    assert (second / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    assert content_hash(second) == content_hash(first)


@pytest.mark.slow  # a subprocess: imports torch, transformers and lightning afresh
def test_train_py_runs_the_rm_stage(tmp_path):
    result = train_cli(["stage=rm", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert "== rlhf-lightning summary ==" in lines
    summary = next(line for line in lines if line.startswith("[rm] accuracy="))
    values = dict(re.findall(r"(\w+)=([-\d.e]+)", summary))
    assert {"accuracy", "loss", "bayes_accuracy"} <= values.keys()
    assert 0.0 <= float(values["accuracy"]) <= 1.0
    artifact = tmp_path / "artifacts" / "reviews" / "rm"
    assert f"[rm] model saved to {artifact}" in lines
    (where,) = [line for line in lines if line.startswith("run directory: ")]
    assert lines[-1].startswith("next: python eval.py mode=rm")  # what to run next, last
    out_dir = Path(where.removeprefix("run directory: "))
    assert out_dir.is_dir() and out_dir.parent == (tmp_path / "outputs" / "rm").resolve()
    assert (out_dir / ".hydra" / "config.yaml").is_file()
    assert (artifact / "model.safetensors").is_file()


@pytest.mark.slow  # a subprocess: train.py as a user runs it
def test_keep_best_under_fsdp_is_refused_before_training(tmp_path):
    """A sharded best.ckpt could not be reloaded and validated: refused in one line once the
    Trainer is built (as ZeRO-3 is), before any step, and nothing is saved."""
    args = ["stage=rm", *TINY, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]
    result = train_cli([*args, "rm.keep=best"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert "rm.keep=best is not supported under FSDP" in result.stderr, result.stderr[-2000:]
    assert "train/loss" not in result.stdout
    assert not (tmp_path / "artifacts" / "reviews" / "rm").exists()
