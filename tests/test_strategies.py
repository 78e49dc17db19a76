"""GPU trainer configs (`trainer=fsdp`, `trainer=deepspeed`) on a machine without a GPU.

`trainer=fsdp` (FSDP2) also runs on CPU processes: tests/test_fsdp.py trains with it.

What can be checked here: they compose with every stage and with cluster overrides, every key is
an argument the class behind it accepts (so a misspelt key fails here, not after a queue wait on
the cluster), and the strategies construct as far as Lightning allows without a GPU. What needs
GPUs (a `Trainer` with these strategies, a run) is not exercised here; see README "Multi-GPU
clusters".
"""

from __future__ import annotations

import importlib.util
import inspect

import lightning as L
import pytest
import torch
from helpers import CONF_DIR, compose
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from rlhf_lightning.config import validate
from rlhf_lightning.fsdp2 import FSDP2Strategy
from rlhf_lightning.models.factory import ModelSpec

STRATEGIES = {"fsdp": FSDP2Strategy, "deepspeed": DeepSpeedStrategy}
# FSDPStrategy hands keyword arguments it does not name on to torch's FSDP wrapper, except those it
# passes itself; so a key there is valid only if FullyShardedDataParallel takes it.
FORWARDED = {
    FSDPStrategy: (FullyShardedDataParallel, {"module", "device_id"}),
    FSDP2Strategy: (ModelParallelStrategy, {"data_parallel_size", "tensor_parallel_size"}),
}
# What `RunContext.trainer` adds to the trainer node when it instantiates it.
RUN_KWARGS = {"callbacks": [], "logger": False, "plugins": [], "max_epochs": 1, "max_steps": 3}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def own_kwargs(node: DictConfig) -> dict:
    """A `_target_` node's keyword arguments, unresolved, without Hydra's own `_..._` keys."""
    container = OmegaConf.to_container(node, resolve=False)
    return {k: v for k, v in container.items() if not (k.startswith("_") and k.endswith("_"))}


def check_kwargs(cls: type, kwargs: dict) -> None:
    """TypeError unless `cls(**kwargs)` names every key: as its own parameter, or (for a class that
    forwards `**kwargs`, see FORWARDED) as a parameter of what it forwards them to."""
    params = inspect.signature(cls).parameters
    own = {
        k: v for k, v in kwargs.items() if k in params and params[k].kind != params[k].VAR_KEYWORD
    }
    inspect.signature(cls).bind_partial(**own)
    rest = {k: v for k, v in kwargs.items() if k not in own}
    if not rest:
        return
    if cls not in FORWARDED:
        raise TypeError(f"{cls.__name__} takes no argument(s) {sorted(rest)}")
    target, passed_by_cls = FORWARDED[cls]
    if clash := sorted(rest.keys() & passed_by_cls):
        raise TypeError(f"{cls.__name__} sets {clash} itself")
    inspect.signature(target).bind_partial(**rest)


def check_trainer_node(trainer: DictConfig) -> None:
    """Every key of the trainer node (and what the run adds) is a `lightning.Trainer` argument, and
    every key of its strategy node an argument its strategy class takes."""
    assert get_class(trainer._target_) is L.Trainer
    inspect.signature(L.Trainer).bind_partial(**{**own_kwargs(trainer), **RUN_KWARGS})
    check_kwargs(get_class(trainer.strategy._target_), own_kwargs(trainer.strategy))


def instantiation_error(node: DictConfig, **kwargs) -> BaseException:
    """What the target raised when Hydra instantiated `node` (Hydra wraps it in its own error)."""
    with pytest.raises(InstantiationException) as info:
        instantiate(node, **kwargs)
    return info.value.__cause__


class _Vocab:
    """What `ModelSpec` reads from a tokenizer to size a tiny model (no tokenizer training)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 64


# ---- composition ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["rm", "policy", "pipeline"])
@pytest.mark.parametrize("option", sorted(STRATEGIES))
def test_gpu_trainer_composes_with_each_stage(option, stage, tmp_path):
    cfg = compose([f"stage={stage}", f"trainer={option}"], tmp_path)
    validate(cfg)
    trainer = cfg.trainer
    assert (trainer.accelerator, trainer.devices, trainer.num_nodes) == ("gpu", -1, 1)
    # FSDP2 runs on CPU processes too, where bf16 autocast would change the numbers
    assert trainer.precision == {"fsdp": "32-true", "deepspeed": "bf16-mixed"}[option]
    assert get_class(trainer.strategy._target_) is STRATEGIES[option]
    # everything else is inherited from trainer/default.yaml, unchanged
    default = OmegaConf.load(CONF_DIR / "trainer" / "default.yaml")
    own = OmegaConf.load(CONF_DIR / "trainer" / f"{option}.yaml")
    unresolved = OmegaConf.to_container(trainer, resolve=False)
    for key in default.keys() - own.keys():
        assert unresolved[key] == OmegaConf.to_container(default, resolve=False)[key], key
    assert trainer.default_root_dir == str(tmp_path / "run")
    check_trainer_node(trainer)


CLUSTER_OVERRIDES = [  # (option, strategy overrides, what they set)
    (
        "fsdp",
        ["trainer.strategy.save_distributed_checkpoint=true"],
        {"save_distributed_checkpoint": True},
    ),
    (
        "deepspeed",
        ["trainer.strategy.stage=3", "trainer.strategy.offload_optimizer=true"],
        {"stage": 3, "offload_optimizer": True},
    ),
]


@pytest.mark.parametrize(("option", "strategy_overrides", "expected"), CLUSTER_OVERRIDES)
def test_cluster_overrides_compose(option, strategy_overrides, expected, tmp_path):
    overrides = [f"trainer={option}", "trainer.devices=8", "trainer.num_nodes=2"]
    cfg = compose(["stage=policy", *overrides, *strategy_overrides], tmp_path)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 2)
    for key, value in expected.items():
        assert cfg.trainer.strategy[key] == value
    check_trainer_node(cfg.trainer)
    if option == "fsdp":
        assert instantiate(cfg.trainer.strategy)._save_distributed_checkpoint is True


@pytest.mark.parametrize(
    ("option", "typo"),
    [
        ("fsdp", "+trainer.strategy.sharding_stratgy=FULL_SHARD"),  # forwarded to torch's FSDP
        ("fsdp", "+trainer.strategy.tensor_parallel_size=2"),  # set by FSDP2Strategy itself
        ("deepspeed", "+trainer.strategy.offload_optimiser=true"),
        ("deepspeed", "+trainer.num_node=2"),  # a Trainer key
    ],
)
def test_a_misspelt_key_fails_the_check(option, typo, tmp_path):
    cfg = compose([f"trainer={option}", typo], tmp_path)
    with pytest.raises(TypeError):
        check_trainer_node(cfg.trainer)


@pytest.mark.parametrize("option", sorted(STRATEGIES))
def test_every_key_is_commented(option):
    """Each key says what it does (on its line or the comment line above); `_target_` is the class
    name itself."""
    lines = (CONF_DIR / "trainer" / f"{option}.yaml").read_text().splitlines()
    for above, line in zip(["#", *lines], lines, strict=False):
        key = line.strip().removeprefix("- ").split(":")[0]
        if ":" not in line or line.lstrip().startswith("#") or key == "_target_":
            continue
        assert "#" in line or above.lstrip().startswith("#"), f"{option}.yaml: no comment: {line}"


# ---- FSDP2 (trainer=fsdp) --------------------------------------------------------------------------


def test_fsdp_strategy_instantiates_with_the_configured_settings(tmp_path):
    strategy = instantiate(compose(["trainer=fsdp"], tmp_path).trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy)  # FSDP2: Lightning's ModelParallelStrategy
    assert strategy._tensor_parallel_size == 1  # data parallel over every process
    assert strategy._save_distributed_checkpoint is False  # one last.ckpt gathered on rank 0


def test_fsdp_wraps_each_decoder_layer_of_the_tiny_models(tmp_path):
    """`fsdp2.shard_trained` makes a unit of each module the model's `_no_split_modules` names."""
    cfg = compose(["trainer=fsdp"], tmp_path)
    spec: ModelSpec = instantiate(cfg.model)
    for model in (spec.causal_lm(_Vocab()), spec.reward_model(_Vocab())):
        wrapped = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
        assert wrapped == list(model.model.layers)
        assert all(isinstance(m, LlamaDecoderLayer) for m in wrapped)


def test_fsdp_precision_refuses_clipping_by_norm():
    """README note: the policy stage clips by norm (`policy.max_grad_norm`) through Lightning's
    precision plugin, which FSDP's refuses; so the note tells users to set it to null."""
    net = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(MisconfigurationException, match="norm"):
        FSDPPrecision("bf16-mixed").clip_gradients(optimizer, 1.0, GradClipAlgorithmType.NORM)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="an FSDP Trainer needs a CUDA GPU")
def test_run_context_builds_the_fsdp_trainer_on_a_gpu(tmp_path):
    from rlhf_lightning.context import RunContext
    from rlhf_lightning.resume import SafeCheckpointIO

    cfg = compose(["stage=rm", "trainer=fsdp", "trainer.devices=1", "logger=csv"], tmp_path)
    trainer = RunContext(cfg).trainer("rm", max_epochs=1)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)


# ---- DeepSpeed: the class imports without the package; construction needs it --------------------


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_deepspeed_strategy_instantiates_with_the_configured_settings(tmp_path):
    strategy = instantiate(compose(["trainer=deepspeed"], tmp_path).trainer.strategy)
    assert isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 2 and "offload_optimizer" not in zero and "offload_param" not in zero


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed")
def test_deepspeed_without_the_package_says_how_to_install_it(tmp_path):
    error = instantiation_error(compose(["trainer=deepspeed"], tmp_path).trainer.strategy)
    assert isinstance(error, MisconfigurationException)
    assert "pip install -U deepspeed" in str(error)
