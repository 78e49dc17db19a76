"""Evaluation callbacks in real `lightning.Trainer` runs on the oracle task (tiny models, CPU).

The proxy is a small random reward model (a `LearnedReward` with `raw`), distinct from the task's
gold reward, so every `eval/*`, `optimum/*`, `best_of_n/*` and `overopt/*` number is exercised.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose, read_wandb_history
from lightning import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from policy_helpers import algorithm_from_conf, build_oracle
from transformers import LlamaConfig, LlamaForSequenceClassification

from rlhf_lightning.callbacks import (
    BestOfNCallback,
    GoldAccuracyCallback,
    KLCallback,
    OptimumGapCallback,
    OverOptimisationCallback,
    PreferenceAccuracyCallback,
    SamplesCallback,
)
from rlhf_lightning.callbacks.common import NO_GOLD
from rlhf_lightning.callbacks.lr_monitor import LearningRateMonitor
from rlhf_lightning.control.beta import FixedBeta
from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.data.spec import FileData, TaskData
from rlhf_lightning.modules.policy import PolicyModule
from rlhf_lightning.modules.reward_model import RewardModelModule
from rlhf_lightning.rewards.learned import LearnedReward

STEPS, EVERY = 4, 2
POLICY_KEYS = [
    "eval/kl",
    "eval/kl_k3",
    "eval/kl_per_token",
    "eval/sqrt_kl",
    "eval/proxy_reward",
    "eval/gold_reward",
    "eval/rm_accuracy",
    "eval/implicit_accuracy",
    "eval/implicit_margin",
    "optimum/objective",
    "optimum/objective_star",
    "optimum/gap",
    "optimum/kl_to_optimum",
    "best_of_n/proxy_max_n",
    "best_of_n/gold_max_n",
    "best_of_n/gold_peak",
    "best_of_n/kl_at_gold_peak",
    "overopt/alpha",
    "overopt/b",
    "overopt/kl_at_measured_peak",
    "overopt/gold_at_peak",
    "overopt/gold_final",
    "overopt/proxy_final",
]


@pytest.fixture(scope="module")
def oracle():
    return build_oracle(seed=0, sft_steps=0)  # a random tiny Llama is reference enough


def reward_model(tokenizer, seed: int = 1) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    return LlamaForSequenceClassification(config).eval()


def proxy_reward(tokenizer) -> LearnedReward:
    """A frozen random reward model behind the `LearnedReward` interface (no artifact)."""
    reward = LearnedReward()
    reward.model, reward.tokenizer = reward_model(tokenizer).requires_grad_(False), tokenizer
    return reward


def policy_module(oracle, exact: bool = True, lr: float = 0.1) -> PolicyModule:
    torch.manual_seed(0)
    return PolicyModule(
        policy=copy.deepcopy(oracle.reference).train().requires_grad_(True),
        reference=oracle.reference,
        reward=proxy_reward(oracle.tokenizer),
        tokenizer=oracle.tokenizer,
        algorithm=algorithm_from_conf("rloo"),
        beta_controller=FixedBeta(0.1),
        optimizer=functools.partial(torch.optim.AdamW, lr=lr),
        generation=oracle.generation,
        exact=oracle.evaluator if exact else None,
    )


def all_callbacks(every: int = EVERY) -> list:
    return [
        KLCallback(every, n_prompts=8, samples_per_prompt=2),
        OverOptimisationCallback(every, n_prompts=8, samples_per_prompt=2),
        BestOfNCallback(n_samples=8, n_prompts=4),
        PreferenceAccuracyCallback(every, n_pairs=8),
        OptimumGapCallback(every),
        SamplesCallback(every, n_prompts=2),
    ]


def fit(module, datamodule, callbacks, logger, root: Path, steps: int = STEPS) -> Trainer:
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(root),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    seed_everything(0, verbose=False)  # the same training draws whatever ran before
    trainer.fit(module, datamodule=datamodule)
    return trainer


def read_csv(trainer: Trainer) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as key -> [(step, value)] over the rows where the key was logged."""
    out: dict[str, list[tuple[int, float]]] = {}
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value != "":
                    out.setdefault(key, []).append((int(row["step"]), float(value)))
    return out


def test_policy_callbacks_log_every_key_to_csv(oracle, tmp_path):
    datamodule = PromptDataModule(
        TaskData(oracle.task, str(tmp_path / "data")), oracle.tokenizer, 4
    )
    callbacks = all_callbacks()
    trainer = fit(policy_module(oracle), datamodule, callbacks, CSVLogger(tmp_path), tmp_path)
    logged = read_csv(trainer)
    for key in POLICY_KEYS:
        assert logged.get(key), f"{key} was not logged"
        assert all(math.isfinite(v) for _, v in logged[key]), (key, logged[key])
    assert [s for s, _ in logged["eval/kl"]] == [0, 2, 4]  # before training, then every 2 steps
    first = {key: values[0][1] for key, values in logged.items()}
    assert first["eval/kl"] == 0.0 and first["eval/kl_k3"] == 0.0  # p_θ = p_ref at step 0
    assert first["eval/implicit_accuracy"] == 0.5  # r̂ ≡ 0: every pair ties
    assert first["optimum/objective"] == pytest.approx(0.0, abs=1e-5)  # J(p_ref) = 0 (standardised)
    assert first["optimum/gap"] == pytest.approx(first["optimum/objective_star"], abs=1e-5)
    assert all(v >= -1e-6 for _, v in logged["optimum/gap"])  # J ≤ J*
    assert logged["eval/kl"][-1][1] > 0.0  # the policy moved
    assert 0.0 <= first["eval/rm_accuracy"] <= 1.0
    assert (
        float(trainer.callback_metrics["overopt/gold_final"]) == logged["overopt/gold_final"][0][1]
    )

    overopt = next(c for c in callbacks if isinstance(c, OverOptimisationCallback))
    kl_logged = [v for _, v in logged["eval/kl"]]
    assert [p["kl"] for p in overopt.points] == pytest.approx(kl_logged)  # one shared pass
    record = json.loads((tmp_path / "overoptimisation.json").read_text())
    assert len(record["points"]) == 3 and len(record["best_of_n"]) == 4  # n = 1, 2, 4, 8
    assert (tmp_path / "overoptimisation.png").stat().st_size > 10_000
    rows = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 3 * 2 * 2  # 3 evaluations × 2 prompts × the KL callback's 2 samples each
    assert json.loads(rows[0])["gold"] is not None


def test_evaluation_leaves_training_unchanged(oracle, tmp_path):
    """Callbacks sample under a forked RNG: training with and without them is identical.

    Also runs without a logger (`logger=none`), where the learning-rate monitor must stand aside.
    """
    weights = []
    for callbacks in ([], [*all_callbacks(every=1), LearningRateMonitor(logging_interval="step")]):
        module = policy_module(oracle)
        datamodule = PromptDataModule(
            TaskData(oracle.task, str(tmp_path / "data")), oracle.tokenizer, 4
        )
        fit(module, datamodule, callbacks, False, tmp_path, steps=2)
        weights.append(torch.cat([p.flatten() for p in module.policy.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_without_gold_logs_proxy_only_and_warns_once(oracle, tmp_path):
    directory = TaskData(oracle.task, str(tmp_path / "data"))._files()
    data = FileData(
        str(directory / "prefs_train.jsonl"), val_path=str(directory / "prefs_val.jsonl")
    )
    datamodule = PromptDataModule(data, oracle.tokenizer, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(
            policy_module(oracle, exact=False),
            datamodule,
            all_callbacks(),
            CSVLogger(tmp_path),
            tmp_path,
        )
    assert sum(NO_GOLD in str(w.message) for w in caught) == 1
    logged = read_csv(trainer)
    for key in ("eval/kl", "eval/proxy_reward", "eval/implicit_accuracy", "overopt/proxy_final"):
        assert logged.get(key) and all(math.isfinite(v) for _, v in logged[key]), key
    absent = [k for k in logged if "gold" in k or k.startswith(("optimum/", "overopt/alpha"))]
    assert absent == []
    assert (tmp_path / "overoptimisation.png").exists()


def test_callback_state_is_saved_in_checkpoints(oracle, tmp_path):
    datamodule = PromptDataModule(
        TaskData(oracle.task, str(tmp_path / "data")), oracle.tokenizer, 4
    )
    callbacks = [
        OverOptimisationCallback(EVERY, n_prompts=4, plot=False),
        BestOfNCallback(n_samples=4, n_prompts=2),
        SamplesCallback(EVERY, n_prompts=2),
    ]
    trainer = fit(policy_module(oracle), datamodule, callbacks, False, tmp_path)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    states = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    restored = [type(c)(n_prompts=1) for c in callbacks]
    for callback, fresh in zip(callbacks, restored):
        fresh.load_state_dict(states[callback.state_key])
    assert restored[0].points == callbacks[0].points and len(callbacks[0].points) == 3
    assert restored[0].last_step == STEPS
    assert restored[1].curve == callbacks[1].curve and len(callbacks[1].curve) == 3
    assert restored[2].rows == callbacks[2].rows and len(callbacks[2].rows) == 3 * 2  # 2 prompts


def test_gold_accuracy_in_reward_model_stage(oracle, tmp_path):
    data = TaskData(oracle.task, str(tmp_path / "data"))
    datamodule = PreferenceDataModule(data, oracle.tokenizer, batch_size=4, max_length=32)
    module = RewardModelModule(
        reward_model(oracle.tokenizer).train(), functools.partial(torch.optim.AdamW, lr=1e-3)
    )
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        callbacks=[GoldAccuracyCallback()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    logged = read_csv(trainer)
    (_, accuracy), (_, agreement) = (
        logged["val/gold_accuracy"][-1],
        logged["val/gold_label_agreement"][-1],
    )
    # by hand: the trained RM's margins against the gold margins on the same pairs
    records = data.load("prefs", "val").records
    gold = oracle.task.gold_reward
    prompts = [r.prompt for r in records]
    gold_margin = gold(prompts, [r.chosen for r in records]) - gold(
        prompts, [r.rejected for r in records]
    )
    scorer = proxy_reward(oracle.tokenizer)
    scorer.model, scorer.max_length = module.reward_model.eval(), 32
    rm_margin = scorer.raw(prompts, [r.chosen for r in records]) - scorer.raw(
        prompts, [r.rejected for r in records]
    )
    decided = gold_margin != 0
    expected = float(((rm_margin * gold_margin)[decided] > 0).double().mean())
    assert accuracy == pytest.approx(expected, abs=1e-6)
    assert agreement == pytest.approx(float((gold_margin[decided] > 0).double().mean()))


def test_run_keeps_each_callback_in_its_stages(tmp_path):
    from rlhf_lightning.context import RunContext

    ctx = RunContext(compose(["stage=pipeline", "logger=none"], tmp_path))
    names = {
        stage: {type(c).__name__ for c in ctx.trainer(stage).callbacks}
        for stage in ("rm", "policy")
    }
    policy_only = {
        "KLCallback",
        "OverOptimisationCallback",
        "BestOfNCallback",
        "PreferenceAccuracyCallback",
        "OptimumGapCallback",
        "SamplesCallback",
    }
    assert policy_only <= names["policy"] and not policy_only & names["rm"]
    assert "GoldAccuracyCallback" in names["rm"] and "GoldAccuracyCallback" not in names["policy"]
    assert "LearningRateMonitor" in names["rm"] and "LearningRateMonitor" in names["policy"]


def test_progress_bar_describes_a_run_bounded_by_steps(tmp_path):
    """Lightning's rich bar prints max_epochs = -1 (the policy stage) as "Epoch 0/-2"."""
    from lightning.pytorch.callbacks import ProgressBar

    from rlhf_lightning.callbacks.progress import StageRichProgressBar
    from rlhf_lightning.context import RunContext

    ctx = RunContext(compose(["logger=none"], tmp_path))

    def description(**length) -> str:
        trainer = ctx.trainer("policy", **length)
        bars = [c for c in trainer.callbacks if isinstance(c, ProgressBar)]
        assert len(bars) == 1 and isinstance(bars[0], StageRichProgressBar)
        ProgressBar.setup(bars[0], trainer, None, "fit")  # what fit does first: the bar's trainer
        return bars[0]._get_train_description(trainer.current_epoch)

    assert description(max_steps=60).startswith("Epoch 0 · ≤ 60 steps")
    assert description(max_epochs=2).startswith("Epoch 0/1")
    quiet = RunContext(compose(["logger=none", "trainer.enable_progress_bar=false"], tmp_path))
    assert not any(isinstance(c, ProgressBar) for c in quiet.trainer("rm").callbacks)


@pytest.mark.slow
def test_wandb_offline_history_has_every_key(oracle, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: stays offline
    datamodule = PromptDataModule(
        TaskData(oracle.task, str(tmp_path / "data")), oracle.tokenizer, 4
    )
    logger = WandbLogger(mode="offline", save_dir=str(tmp_path), project="test-callbacks")
    try:
        fit(policy_module(oracle), datamodule, all_callbacks(), logger, tmp_path)
    finally:
        logger.experiment.finish()
        wandb.teardown()  # stop the wandb service, so every record is on disk before reading
    history = read_wandb_history(tmp_path)
    for key in POLICY_KEYS:
        values = history.get(key)
        assert values and all(isinstance(v, float | int) and math.isfinite(v) for v in values), key
    kinds = {
        "overopt/points": "table-file",
        "overopt/curve_table": "table-file",
        "best_of_n/curve": "table-file",
        "samples/table": "table-file",
        "eval/kl_histogram": "histogram",
        "overopt/plot": "image-file",
    }
    for key, kind in kinds.items():  # wandb objects are stored as nested keys
        assert history.get(f"{key}/_type") and set(history[f"{key}/_type"]) == {kind}, key
    assert history["overopt/points/nrows"] == [1, 2, 3]  # re-logged with every point so far
    assert history["samples/table/nrows"] == [4, 8, 12]


def test_step_time_leaves_out_evaluation_run_after_the_step(tmp_path):
    """Callbacks run in list order at each hook: StepTime before a callback that evaluates at the
    end of a step does not count the evaluation; the default list puts it before every one."""
    import time

    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from rlhf_lightning.callbacks.step_time import StepTime

    class Evaluation(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            time.sleep(0.3)

    class Record(StepTime):
        seconds: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    def steps(callbacks) -> list[float]:
        Record.seconds = []
        L.Trainer(
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=tmp_path,
        ).fit(BoringModel())
        return Record.seconds

    assert all(s < 0.25 for s in steps([Record(), Evaluation()]))
    assert all(s >= 0.3 for s in steps([Evaluation(), Record()]))  # the order is what decides
    names = list(compose([*TINY, "stage=policy"], tmp_path).callbacks)
    evaluating = ("kl", "overoptimisation", "preference_accuracy", "samples", "optimum_gap")
    assert all(names.index("step_time") < names.index(n) for n in evaluating), names


def test_step_time_logs_each_steps_seconds_and_the_peak_memory(tmp_path):
    from rlhf_lightning.run import run

    cfg = compose(
        [*TINY, "stage=rm", "callbacks=step_time", "logger=csv", "trainer.log_every_n_steps=1"],
        tmp_path,
    )
    run(cfg)
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "rm" / "metrics.csv").open()))
    seconds = [float(r["time/step_seconds"]) for r in rows if r.get("time/step_seconds")]
    peaks = [float(r["memory/peak_rss_mib"]) for r in rows if r.get("memory/peak_rss_mib")]
    steps = {int(r["step"]) for r in rows if r.get("time/step_seconds")}
    assert len(seconds) == len(steps) >= 2 and all(0 < s < 60 for s in seconds)
    assert peaks == sorted(peaks) and peaks[0] > 100  # a high-water mark: torch alone is > 100 MiB
