"""The config tree: every option of every group composes, validates and instantiates; bad values
fail at start-up with one line naming the key; unknown keys and options fail through `train.py`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import CONF_DIR, TINY, compose, train_cli
from hydra.utils import get_object, instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rlhf_lightning.config import STAGES, validate
from rlhf_lightning.context import RunContext
from rlhf_lightning.control.beta import BetaController
from rlhf_lightning.data.spec import FileData, TaskData
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.models.factory import ModelSpec
from rlhf_lightning.modules.algorithm import Algorithm
from rlhf_lightning.modules.reward_model import RewardModelModule
from rlhf_lightning.modules.sft import SFTModule
from rlhf_lightning.rewards.base import RewardFunction
from rlhf_lightning.tasks.base import Task

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
# What an option needs before it validates: its `???` values, or the combination it requires.
REQUIRED = {
    ("data", "jsonl"): ["data.path=prefs.jsonl"],
    ("model", "hf"): ["model.name_or_path=some/local/dir"],
    ("algo", "exact"): ["task=oracle"],
}

# Top-level keys whose `_target_` nodes the tests below instantiate; a new one needs a test.
INSTANTIATED = {"task", "data", "model", "logger", "callbacks", "kl_controller", "reward"}
INSTANTIATED |= {"trainer", "checkpoint", "rm", "sft", "policy", "dpo"}


def options(group: str) -> list[str]:
    return [option for g, option in OPTIONS if g == group]


def compose_option(group: str, option: str, tmp_path, extra: tuple[str, ...] = ()):
    return compose([f"{group}={option}", *REQUIRED.get((group, option), []), *extra], tmp_path)


def pinned_options(own) -> list[tuple[str, str]]:
    """(group, option) of each `override /group: option` in an option's defaults list."""
    entries = [e for e in own.get("defaults", []) if isinstance(e, DictConfig)]
    pairs = [(key, value) for entry in entries for key, value in entry.items()]
    return [(k.removeprefix("override /"), v) for k, v in pairs if k.startswith("override /")]


def targets(node) -> list[str]:
    """Every `_target_` string anywhere in a (resolved-or-not) config container."""
    if isinstance(node, dict):
        found = [node["_target_"]] if "_target_" in node else []
        return found + [t for value in node.values() for t in targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in targets(value)]
    return []


# ---- every option composes, validates, and every _target_ resolves ------------------------------


def test_defaults_list_groups_exist():
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").defaults
    for entry in defaults:
        if entry == "_self_":
            continue
        (key,) = entry.keys()
        if key.startswith("override "):  # Hydra's own groups (hydra/job_logging, ...)
            continue
        group = key.removeprefix("optional ").strip()
        if key.startswith("optional ") and not (CONF_DIR / group).is_dir():
            continue  # an optional group may have no options yet
        assert group in GROUPS, f"defaults list names group '{group}' with no conf/{group}/"
        if entry[key] is not None:
            assert (CONF_DIR / group / f"{entry[key]}.yaml").exists()


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option, tmp_path):
    cfg = compose_option(group, option, tmp_path)
    path = CONF_DIR / group / f"{option}.yaml"
    own = OmegaConf.load(path)
    selected = cfg if "@package _global_" in path.read_text() else cfg[group]
    for key in own.keys() - {"defaults", "hydra"}:  # the option's own keys made it in
        assert key in selected, f"{group}={option}: key '{key}' missing after composition"
    for other, chosen in pinned_options(own):  # `override /group: option` took effect
        pinned = OmegaConf.load(CONF_DIR / other / f"{chosen}.yaml")
        for field in {"_target_", "name"} & pinned.keys():
            assert cfg[other][field] == pinned[field], f"{group}={option}: {other}={chosen}"
    validate(cfg)
    container = OmegaConf.to_container(cfg, resolve=False)
    for target in targets(container):
        assert get_object(target) is not None, f"{group}={option}: cannot import {target}"
    with_targets = {key for key, node in container.items() if targets(node)}
    assert with_targets <= INSTANTIATED, f"no test instantiates {with_targets - INSTANTIATED}"


# ---- every node with a _target_ instantiates ----------------------------------------------------


@pytest.mark.parametrize("option", options("task"))
def test_task_and_its_data_instantiate(option, tmp_path):
    cfg = compose_option("task", option, tmp_path)
    task = instantiate(cfg.task)
    assert isinstance(task, Task) and task.name == option
    data = instantiate(cfg.data)  # data=task wraps the selected task
    assert isinstance(data, TaskData) and data.task.name == option and data.name == option
    assert data.directory == tmp_path / "data" / option


def test_file_data_instantiates(tmp_path):
    cfg = compose(["data=jsonl", "data.path=prefs.jsonl", "data.val_fraction=0.25"], tmp_path)
    data = instantiate(cfg.data)
    assert isinstance(data, FileData) and data.task is None
    assert (data.path, data.val_fraction, data.name) == ("prefs.jsonl", 0.25, "custom")


@pytest.mark.parametrize("option", options("model"))
def test_model_spec_instantiates(option, tmp_path):
    cfg = compose_option("model", option, tmp_path)
    spec = instantiate(cfg.model)
    assert isinstance(spec, ModelSpec)
    assert spec.is_tiny == (option == "tiny")
    assert spec.config == OmegaConf.to_container(cfg.model.config) and spec.dtype == "float32"
    if option == "smollm2":  # the GGUF of the installed wheel, converted into a cached HF folder
        assert (Path(spec.name_or_path) / "config.json").exists()
        assert (Path(spec.name_or_path) / "gguf_manifest.json").exists()
    else:
        assert spec.name_or_path == cfg.model.name_or_path


@pytest.mark.parametrize("option", options("logger"))
def test_logger_instantiates(option, tmp_path):
    ctx = RunContext(compose_option("logger", option, tmp_path))
    logger = ctx._logger("rm")
    expected = {"csv": CSVLogger, "wandb": WandbLogger, "tensorboard": TensorBoardLogger}.get(
        option
    )
    if expected is None:
        assert logger is False
        return
    assert isinstance(logger, expected)
    assert str(tmp_path / "run") in str(logger.save_dir)
    if option == "wandb":  # constructed lazily: nothing started, offline under the tests
        assert logger._wandb_init["mode"] == "offline" and logger._experiment is None


@pytest.mark.parametrize("option", options("callbacks"))
def test_callbacks_and_trainer_instantiate(option, tmp_path):
    cfg = compose_option("callbacks", option, tmp_path)  # (a WandbLogger starts no run here)
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values()]
    assert all(isinstance(c, Callback) for c in callbacks)
    ctx = RunContext(cfg)
    for stage in STAGES:  # each stage's trainer gets the callbacks declared for it + checkpoints
        trainer = ctx.trainer(stage, max_epochs=1)
        assert isinstance(trainer, L.Trainer) and trainer.max_epochs == 1
        checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        assert [c.dirpath for c in checkpoints] == [str(tmp_path / "run" / "checkpoints" / stage)]
        kinds = {type(c) for c in callbacks}
        wanted = [type(c) for c in callbacks if stage in getattr(c, "stages", (stage,))]
        got = [type(c) for c in trainer.callbacks if type(c) in kinds]
        assert sorted(map(str, got)) == sorted(map(str, wanted))
    if option != "none":  # every callback runs in some stage
        assert all(set(getattr(c, "stages", STAGES)) & set(STAGES) for c in callbacks)


@pytest.mark.parametrize("option", options("kl_controller"))
def test_kl_controller_instantiates(option, tmp_path):
    cfg = compose_option("kl_controller", option, tmp_path)
    controller = instantiate(cfg.kl_controller)
    assert isinstance(controller, BetaController) and controller.value == cfg.algo.beta


@pytest.mark.parametrize("option", options("reward"))
def test_reward_constructs(option, tmp_path):
    reward = instantiate(compose_option("reward", option, tmp_path).reward)
    assert isinstance(reward, RewardFunction)
    members = getattr(reward, "members", {})
    assert all(isinstance(m, RewardFunction) for m in members.values())
    if members:
        assert sum(reward.weights.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("option", options("algo"))
def test_algo_builds_the_algorithm(option, tmp_path):
    algo = OmegaConf.to_container(compose_option("algo", option, tmp_path).algo)
    algo.pop("beta")  # the policy stage hands beta to the controller, the rest to Algorithm
    assert Algorithm(**algo).name == option


def test_stage_modules_and_optimisers_instantiate(tmp_path):
    cfg = compose(TINY, tmp_path)
    net = nn.Linear(3, 1)
    rm = instantiate(cfg.rm.module, reward_model=net, bayes_accuracy=0.9)
    sft = instantiate(cfg.sft.module, policy=net)
    assert isinstance(rm, RewardModelModule) and isinstance(sft, SFTModule)
    for module, lr in ((rm, 1e-3), (sft, 3e-3)):
        optimizer = module.optimizer_factory(net.parameters())
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == lr
        scheduler = module.scheduler_factory(optimizer, num_training_steps=100)
        assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    policy_optimizer = instantiate(cfg.policy.optimizer)(net.parameters())
    assert policy_optimizer.defaults["betas"] == (0.9, 0.95)


def test_every_stages_adamw_is_fused_and_steps_as_the_per_tensor_one(tmp_path):
    """The stages' AdamW runs fused (one kernel over all tensors: 0.40 → 0.08 s a step for
    SmolLM2's 135M parameters on 2 CPU threads, session 10); the step it takes is the
    per-tensor (`foreach=False`) AdamW's to float32 round-off, after 5 steps with decay."""
    cfg = compose(TINY, tmp_path)
    for node in (
        cfg.rm.module.optimizer,
        cfg.sft.module.optimizer,
        cfg.dpo.module.optimizer,
        cfg.policy.optimizer,
    ):
        assert node.fused is True
    factory = instantiate(cfg.rm.module.optimizer)  # lr 1e-3, weight decay 0.01
    nets = []
    for fused in (True, False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
        optimizer = factory(net.parameters(), **({} if fused else {"fused": False}))
        assert optimizer.defaults["fused"] is fused
        data = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            optimizer.zero_grad()
            net(data).square().mean().backward()
            optimizer.step()
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    assert any(
        (a - s).abs().max() > 1e-3
        for a, s in zip(nets[0].parameters(), start.parameters(), strict=True)
    )  # the 5 steps moved the weights (lr 1e-3 each)


def test_dpo_module_instantiates(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_lightning.modules.dpo import DPOModule

    cfg = compose(TINY, tmp_path)
    tiny = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    policy, reference = LlamaForCausalLM(tiny), LlamaForCausalLM(tiny)
    dpo = instantiate(cfg.dpo.module, policy=policy, reference=reference, tokenizer=None)
    assert isinstance(dpo, DPOModule) and dpo.beta.value == cfg.dpo.beta
    optimizer = dpo.optimizer_factory(dpo.trained_parameters())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert not any(p.requires_grad for p in dpo.reference.parameters())  # frozen


@pytest.mark.parametrize(
    "overrides", [[], ["algo=ppo", "policy.optimizer.lr=1e-3", "kl.penalty=reward"]]
)
def test_policy_module_instantiates_with_the_objects_as_they_are(overrides, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_lightning.generation.settings import GenerationSettings
    from rlhf_lightning.modules.policy import PolicyModule
    from rlhf_lightning.stages.common import build_module

    cfg = compose([*TINY, *overrides], tmp_path)
    tiny = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    algo = OmegaConf.to_container(cfg.algo)
    algo.pop("beta")
    generation, algorithm = GenerationSettings(max_new_tokens=4), Algorithm(**algo)
    module = build_module(
        cfg.policy.module,
        policy=LlamaForCausalLM(tiny),
        reference=LlamaForCausalLM(tiny),
        reward=lambda prompts, responses: torch.zeros(len(prompts)),
        tokenizer=None,
        generation=generation,
        exact=None,
        algorithm=algorithm,
        beta_controller=instantiate(cfg.kl_controller),
    )
    assert isinstance(module, PolicyModule)
    assert module.generation is generation and module.algorithm is algorithm  # not DictConfigs
    assert (module.kl_estimator, module.kl_penalty) == (cfg.kl.estimator, cfg.kl.penalty)
    assert module.max_grad_norm == cfg.policy.max_grad_norm and module.seed == cfg.seed
    assert module.shared_prefix == cfg.policy.shared_prefix
    optimizer = module.configure_optimizers()
    assert optimizer.defaults["lr"] == cfg.policy.optimizer.lr
    assert optimizer.defaults["betas"] == tuple(cfg.policy.optimizer.betas)


def test_checkpoint_instantiates(tmp_path):
    checkpoint = instantiate(compose([], tmp_path).checkpoint)
    assert isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last
    assert checkpoint.dirpath == str(tmp_path / "run" / "checkpoints")


# ---- impossible values fail at start-up with one line naming the key ---------------------------

BAD_VALUES = [
    (["rm.module.optimizer.lr=-1e-3"], "rm.module.optimizer.lr"),
    (["sft.module.optimizer.lr=0"], "sft.module.optimizer.lr"),
    (["policy.optimizer.lr=-0.1"], "policy.optimizer.lr"),
    (["algo.beta=-0.1"], "algo.beta"),
    (["algo.name=sac"], "algo.name"),
    (["algo=rloo", "algo.group_size=1"], "algo.group_size"),
    (["algo=grpo", "algo.group_size=1"], "algo.group_size"),
    (["kl_controller=budget", "kl_controller.epsilon=0"], "kl_controller.epsilon"),
    (["kl_controller=budget", "kl_controller.epsilon=-2.0"], "kl_controller.epsilon"),
    (["kl_controller=adaptive", "kl_controller.target=0"], "kl_controller.target"),
    (["rm.batch_size=abc"], "rm.batch_size"),
    (["rm.batch_size=1.5"], "rm.batch_size"),
    (["rm.max_epochs=0"], "rm.max_epochs"),
    (["seed=abc"], "seed"),
    (["kl.estimator=k4"], "kl.estimator"),
    (["policy.generation.temperature=0"], "policy.generation.temperature"),
    (["data=jsonl"], "data.path"),
    (["data=jsonl", "data.path=x.jsonl", "data.val_fraction=1.0"], "data.val_fraction"),
    (["stage=policy", "algo=exact"], "task=oracle"),
    (["rm.micro_batch_size=0"], "rm.micro_batch_size"),
    (["sft.max_tokens_per_micro_batch=2.5"], "sft.max_tokens_per_micro_batch"),
    (["policy.forward_batch_size=-1"], "policy.forward_batch_size"),
    (["model.gradient_checkpointing=3"], "model.gradient_checkpointing"),
    (["rm.keep=first"], "rm.keep"),
    (["rm.monitor=val/margin"], "rm.monitor"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_bad_value_fails_with_one_line_naming_the_key(overrides, key, tmp_path):
    cfg = compose(overrides, tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert key in message and "\n" not in message


# ---- unknown keys and options fail through train.py --------------------------------------------


@pytest.mark.parametrize(
    ("override", "named"),
    [("rm.bogus=1", "rm.bogus"), ("stage=nope", "stage/nope"), ("algo=sac", "algo/sac")],
)
def test_unknown_key_or_option_fails_in_train_py(override, named, tmp_path):
    result = train_cli(["stage=rm", override], tmp_path, timeout=60)
    assert result.returncode != 0
    assert named in result.stderr
    assert not (tmp_path / "artifacts").exists()  # nothing ran
