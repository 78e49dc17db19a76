"""What the evaluation callbacks share: when to run, what to evaluate on, and how to log it.

- Schedule: `every_n_steps` optimiser steps (`trainer.global_step`; with manual optimisation that
  is one per `optimizer.step()`, so PPO with several minibatches advances it several times per
  rollout), plus once before training (the SFT policy) and once at the end.
- Prompts: the first `n_prompts` of the prompt datamodule's fixed held-out split
  (`trainer.datamodule.prompts["eval"]`); the gold reward is the task's, when the data is a
  built-in task (`trainer.datamodule.data.task.gold_reward`), else the callbacks log the proxy only.
- Sampling runs on rank zero under a fixed seed in a forked RNG: training draws the same random
  numbers with or without callbacks, and every evaluation uses the same seed (common random numbers,
  so step-to-step differences are not sampling noise). Callbacks asking for the same samples at
  the same step share one pass (`shared_samples`).
- Logging goes to every logger in `trainer.loggers` as scalars; Weights & Biases loggers also get
  wandb objects (tables, histograms, custom charts) in the same history row.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.modules.evaluation import sample_and_score
from rlhf_lightning.sharding import gathered_weights

NO_GOLD = (
    "the data has no gold reward (it is not a built-in task): evaluation callbacks log the proxy "
    "reward only"
)
_warned_no_gold: weakref.WeakSet = weakref.WeakSet()  # trainers already told
_sample_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trainer -> (step, draws)


def gold_reward(trainer: L.Trainer) -> Callable | None:
    """The task's gold reward function, or None (one rank-zero warning per trainer)."""
    task = getattr(getattr(trainer.datamodule, "data", None), "task", None)
    gold = getattr(task, "gold_reward", None)
    if gold is None and trainer not in _warned_no_gold:
        _warned_no_gold.add(trainer)
        rank_zero_warn(NO_GOLD)
    return gold


def eval_prompts(trainer: L.Trainer, n_prompts: int, owner: str) -> list[str]:
    """The first `n_prompts` held-out prompts of the prompt datamodule."""
    prompts = getattr(trainer.datamodule, "prompts", None) or {}
    if not prompts.get("eval"):
        raise ConfigError(
            f"{owner} evaluates on held-out prompts (trainer.datamodule.prompts['eval']) but the "
            "trainer has no prompt datamodule with eval prompts: fit with "
            "datamodule=PromptDataModule(...), or run with callbacks=none"
        )
    return list(prompts["eval"][:n_prompts])


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module, seed: int) -> Iterator[None]:
    """Eval mode and a seeded, forked RNG for the duration; both restored afterwards."""
    was_training = model.training
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def _step_cache(trainer: L.Trainer) -> dict:
    """Samples drawn at the current step, by (model id, prompts, samples_per_prompt, seed)."""
    step, entries = _sample_cache.get(trainer, (None, {}))
    if step != trainer.global_step:
        step, entries = trainer.global_step, {}
        _sample_cache[trainer] = (step, entries)
    return entries


def shared_samples(
    trainer: L.Trainer,
    module,
    model,
    prompts: list[str],
    samples_per_prompt: int,
    seed: int,
    batch_size: int = 256,
) -> dict:
    """`sample_and_score` of `model` on `prompts` (with gold when known), memoised per step.

    Two callbacks with equal settings at the same `global_step` get the same samples from one pass.
    batch_size: responses generated per `generate` call (on CPU, time grows with the number of
    calls far more than with their width).
    """
    entries = _step_cache(trainer)
    key = (id(model), tuple(prompts), samples_per_prompt, seed)
    if key not in entries:
        gold = gold_reward(trainer)
        with evaluation_mode(model, seed):
            entries[key] = sample_and_score(
                module, model, prompts, samples_per_prompt, gold=gold, batch_size=batch_size
            )
    return entries[key]


def samples_of_this_step(trainer: L.Trainer, model, prompts: list[str]) -> dict | None:
    """The rows for `prompts` of samples another callback drew from `model` at this step.

    Only from a draw whose prompts start with `prompts` (the same held-out prefix); else None.
    """
    for (model_id, drawn, samples_per_prompt, _), samples in _step_cache(trainer).items():
        if model_id == id(model) and drawn[: len(prompts)] == tuple(prompts):
            rows = len(prompts) * samples_per_prompt  # grouped by prompt, in prompt order
            return {k: None if v is None else v[:rows] for k, v in samples.items()}
    return None


def log_metrics(
    trainer: L.Trainer,
    scalars: dict[str, float],
    step: int,
    wandb_objects: Callable[[], dict] | None = None,
) -> None:
    """Scalars to every logger (and `trainer.callback_metrics`); wandb objects to wandb loggers.

    `wandb_objects` is called only when a wandb logger exists, so wandb is never imported for
    CSV-only runs.
    """
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            extra = wandb_objects() if wandb_objects is not None else {}
            logger.experiment.log({**scalars, **extra, "trainer/global_step": step})
        elif scalars:
            logger.log_metrics(scalars, step=step)
            logger.save()
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in scalars.items()})


class EvalCallback(L.Callback):
    """Base of the evaluation callbacks of the policy and DPO stages (a module with `.policy`,
    `.reference`, `.reward`, `.tokenizer`, `.generation`, `.beta`): the schedule and its state.

    Subclasses implement `evaluate(trainer, module)`, which runs on rank zero only.
    every_n_steps: evaluate when this many optimiser steps passed since the last evaluation.
    at_start / at_end: also evaluate before the first step / after the last one.
    """

    stages: tuple[str, ...] = ("policy", "dpo")

    def __init__(self, every_n_steps: int = 10, at_start: bool = True, at_end: bool = True):
        if every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.at_start, self.at_end = every_n_steps, at_start, at_end
        self.last_step: int | None = None

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        raise NotImplementedError

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start and self.last_step != trainer.global_step:
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = 0 if self.last_step is None else self.last_step
        if trainer.global_step - last >= self.every_n_steps:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and self.last_step != trainer.global_step:
            self._run(trainer, pl_module)

    def _run(self, trainer, pl_module) -> None:
        self.last_step = trainer.global_step
        with gathered_weights(trainer):  # every rank enters: under FSDP it gathers the weights
            if trainer.is_global_zero:
                self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step = state_dict.get("last_step")
