"""Work on whole weights and global gradients when a strategy shards them (FSDP, DeepSpeed ZeRO).

Two FSDPs: torch's FSDP2 (`fully_shard`, under Lightning's ModelParallelStrategy: `trainer=fsdp`,
see `rlhf_lightning/fsdp2.py`) and FSDP1 (Lightning's FSDPStrategy, GPU only). Under FSDP1
FULL_SHARD each rank holds only a shard of every weight outside the forward pass
(with `use_orig_params=True`, which Lightning sets, a parameter is a 1-D slice of its flat shard).
Work that rank zero does alone outside a training step (the evaluation callbacks, the end-of-stage
evaluation, `save_pretrained`) then meets sharded weights: a forward fails ("'weight' must be
2-D") and `save_pretrained` waits for an all-gather the other ranks never join. `gathered_weights`
gathers the whole weights on every rank for the length of a `with` block; every rank must enter it.

Gradient clipping by the global norm ‖g‖₂ = (Σ_p ‖g_p‖²)^½ needs the sum over all ranks' shards:
FSDP's root module computes it (`FullyShardedDataParallel.clip_grad_norm_`), DeepSpeed clips inside
its engine (config key `gradient_clipping`). `clip_grad_norm` picks the right one.
See https://pytorch.org/docs/stable/fsdp.html (summon_full_params, clip_grad_norm_).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.fsdp2 import check_fsdp2, is_fsdp2, unsharded

ZERO3_UNSUPPORTED = (
    "DeepSpeed ZeRO stage 3 is not supported yet: rank-zero evaluation and saving need the whole "
    "weights, which stage 3 shards — use trainer.strategy.stage=2 (or trainer=fsdp)"
)


def is_sharded(trainer) -> bool:
    """Whether the trainer's strategy shards the weights (FSDP1 or FSDP2)."""
    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy) or is_fsdp2(trainer)


def check_strategy(strategy) -> None:
    """Refuse, before training, a strategy whose sharded weights we cannot gather (ZeRO stage 3)."""
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        raise ConfigError(ZERO3_UNSUPPORTED)
    if isinstance(strategy, ModelParallelStrategy):
        check_fsdp2(strategy)


@contextlib.contextmanager
def gathered_weights(trainer) -> Iterator[None]:
    """Whole (unsharded) weights on every rank inside the block; the shards again after it.

    For rank-zero-only work on a sharded model: EVERY rank must enter the block (gathering is a
    collective), and only the work inside it is done on rank zero alone::

        with gathered_weights(trainer):
            if trainer.is_global_zero:
                save_model_artifact(...)

    FSDP: `summon_full_params` on `trainer.model` (Lightning's FSDP root, which wraps the
    LightningModule) for all nested units; changes to weights inside are discarded
    (writeback=False), so the block must only read them. Gradients stay sharded. Not inside a
    forward or backward pass; no backward inside it. Inside, the nested FSDP units are taken out of
    the module tree and generate's FSDP detection is off, so forwards and `generate` on rank zero
    alone run without collectives (see `_bypassed_units`). Each rank holds the whole model inside.
    FSDP2: `fsdp2.unsharded` on the LightningModule (one all-gather per unit at entry; inside,
    plain whole tensors: forwards, `generate` and `save_pretrained` on rank zero alone).
    DeepSpeed ZeRO stage 3: ConfigError (see `check_strategy`). Anything else (one process, DDP,
    ZeRO 1/2, FSDP NO_SHARD): weights are whole already, the block runs as it is.
    """
    strategy = trainer.strategy
    check_strategy(strategy)
    if is_fsdp2(trainer):
        with unsharded(trainer.lightning_module):
            yield
        return
    if not isinstance(strategy, FSDPStrategy):
        yield
        return
    root = _fsdp_root(trainer)
    with (
        FullyShardedDataParallel.summon_full_params(
            root,
            recurse=True,  # the nested units (one per decoder layer) too
            writeback=False,  # read-only: nothing to scatter back on exit
            rank0_only=False,  # every rank gathers; rank0_only=True would save memory off rank 0
            offload_to_cpu=False,  # keep the weights where the forward runs
            with_grads=False,
        ),
        _bypassed_units(root),
    ):
        yield


@contextlib.contextmanager
def _bypassed_units(root: torch.nn.Module) -> Iterator[None]:
    """Inside `summon_full_params`: the model as a plain one, for a forward on rank zero alone.

    - Each nested FSDP unit is replaced by the module it wraps (put back afterwards). A unit's
      first forward sees its gathered weights, but FSDP frees them after that forward (FULL_SHARD
      reshards after forward) and the next forward all-gathers again: a collective rank zero
      cannot do alone (generation calls each layer once per token). The plain layer reads the
      gathered weights every time.
    - FSDP marks every module it manages (`_is_fsdp_managed_module`, torch's mark for dynamo),
      and transformers' `generate` then defaults to `synced_gpus=True`: an all-reduce per token,
      which on rank zero alone fails. The mark is lifted for the block (and restored).
    """
    units = [
        (parent, name, child)
        for parent in root.modules()
        for name, child in parent.named_children()
        if isinstance(child, FullyShardedDataParallel)
    ]
    marked = [m for m in root.modules() if getattr(m, "_is_fsdp_managed_module", False)]
    for parent, name, unit in units:
        parent._modules[name] = unit.module
    for module in marked:
        module._is_fsdp_managed_module = False
    try:
        yield
    finally:
        for module in marked:
            module._is_fsdp_managed_module = True
        for parent, name, unit in reversed(units):
            parent._modules[name] = unit


def deepspeed_gradient_clipping(strategy, max_norm: float | None) -> None:
    """Under DeepSpeed, write `max_norm` into the engine config before `trainer.fit`.

    Lightning refuses `Trainer(gradient_clip_val=...)` with manual optimisation, and DeepSpeed
    clips inside `engine.step()` with its config's `gradient_clipping` (Lightning's
    `clip_gradients` does nothing there). A value the user set in `strategy.config` is kept, and
    `clip_grad_norm` later refuses it if it differs from `max_norm`. Other strategies: no-op.
    """
    if isinstance(strategy, DeepSpeedStrategy) and max_norm:
        strategy.config.setdefault("gradient_clipping", float(max_norm))


def clip_grad_norm(module, optimizer, max_norm: float) -> None:
    """Scale all gradients by min(1, max_norm / ‖g‖₂), ‖g‖₂ the norm over every rank's gradients.

    Call on every rank, after the backward pass and before `optimizer.step()`.
    FSDP: the root module's `clip_grad_norm_` (all-reduces the shards' squared norms; clips every
    gradient under the root, which with frozen models kept outside the module tree is the
    optimiser's). Lightning's own clipping refuses FSDP, and `torch.nn.utils.clip_grad_norm_`
    would see one shard's norm only.
    DeepSpeed: the engine clips in `optimizer.step()`; this only checks that it clips at
    `max_norm` (see `deepspeed_gradient_clipping`).
    FSDP2 and otherwise: Lightning's `module.clip_gradients(optimizer, max_norm, "norm")` (on
    FSDP2's DTensor gradients torch's `clip_grad_norm_` all-reduces the shards' squared norms).
    """
    trainer = module.trainer
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        _fsdp_clip(trainer, max_norm)
    elif isinstance(strategy, DeepSpeedStrategy):
        _check_deepspeed_clip(strategy, max_norm)
    elif _fused_under_amp(trainer.precision_plugin, optimizer):
        # bf16-mixed: no loss scale to unscale, so Lightning's refusal of a fused optimizer under
        # AMP does not apply; the base plugin's clipping is the one it would run
        Precision.clip_gradients(trainer.precision_plugin, optimizer, max_norm, "norm")
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


def _fused_under_amp(plugin, optimizer) -> bool:
    """Whether `optimizer` unscales inside its step (fused AdamW) under Lightning's AMP plugin;
    with a loss scaler (`16-mixed`) clipping would see scaled gradients: a ConfigError."""
    unscales = getattr(optimizer, "_step_supports_amp_scaling", False)  # what Lightning reads
    if not (isinstance(plugin, MixedPrecision) and unscales):
        return False
    if plugin.scaler is not None:
        raise ConfigError(
            "gradient clipping with a fused optimizer under precision=16-mixed: the optimiser "
            "unscales the float16 gradients inside its step, after clipping would have seen "
            "them scaled. Set the stage's optimizer fused=false (e.g. rm.module.optimizer."
            "fused=false, policy.optimizer.fused=false), or use trainer.precision=bf16-mixed"
        )
    return True


def _fsdp_root(trainer) -> FullyShardedDataParallel:
    """`trainer.model`, which under FSDPStrategy must be the root FSDP unit Lightning wrapped."""
    root = trainer.model
    if not isinstance(root, FullyShardedDataParallel):
        raise RuntimeError(
            f"under FSDPStrategy trainer.model should be the root FSDP unit, but it is a "
            f"{type(root).__name__}: Lightning set the model up again over its FSDP units "
            "(trainer.validate/test after trainer.fit, which leaves the root's weights as "
            "orphaned shards) or the LightningModule wrapped itself in configure_model"
        )
    return root


def _fsdp_clip(trainer, max_norm: float) -> torch.Tensor:
    root = _fsdp_root(trainer)
    if getattr(trainer.strategy.precision_plugin, "scaler", None) is not None:
        raise ConfigError(
            "gradient clipping under FSDP with precision=16-mixed would clip loss-scaled "
            "gradients: use trainer.precision=bf16-mixed, or set policy.max_grad_norm=null"
        )
    return root.clip_grad_norm_(max_norm)


def _check_deepspeed_clip(strategy, max_norm: float) -> None:
    engine_norm = strategy.config.get("gradient_clipping")
    if engine_norm != max_norm:
        raise ConfigError(
            f"policy.max_grad_norm={max_norm} but DeepSpeed clips inside its engine at "
            f"gradient_clipping={engine_norm}: remove gradient_clipping from "
            "trainer.strategy.config (the policy stage then sets it), or set the two equal"
        )
