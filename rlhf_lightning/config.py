"""Start-up checks of the composed configuration: impossible values fail before any work starts.

Hydra already rejects unknown keys and unknown group options (the config is in struct mode); this
module checks values: `validate` train.py's config, `validate_eval` eval.py's. Each rule names the
key, what is wrong and what would be right, in one line. Nothing here imports torch, transformers
or Lightning (names come from `choices`), so a bad value fails before they are imported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from rlhf_lightning.choices import (
    ALGORITHMS,
    DECAY_EXCLUSIONS,
    DPO_LOSSES,
    DTYPES,
    KEEP,
    KL_ESTIMATORS,
    MONITORS,
    STAGES,
)
from rlhf_lightning.errors import ConfigError


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x) -> bool:
    return _number(x) and x > 0


def _non_negative(x) -> bool:
    return _number(x) and x >= 0


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _fraction(x) -> bool:
    return _number(x) and 0 < x < 1


# BOS + one prompt token + one response token + EOS: the shortest sequence worth training on
MIN_LENGTH = 4
_LENGTH = f"an integer >= {MIN_LENGTH} (BOS + one prompt token + one response token + EOS)"


def _sequence_length(x) -> bool:
    return _positive_int(x) and x >= MIN_LENGTH


def _null_or_positive_int(x) -> bool:
    return x is None or _positive_int(x)


# (key, check, what a valid value is)
RULES: list[tuple[str, Callable[[object], bool], str]] = [
    ("seed", lambda x: isinstance(x, int) and not isinstance(x, bool), "an integer"),
    ("rm.module.optimizer.lr", _positive, "a number > 0"),
    ("rm.module.centering", _non_negative, "a number >= 0"),
    ("rm.batch_size", _positive_int, "an integer > 0"),
    ("rm.max_length", _sequence_length, _LENGTH),
    ("rm.max_epochs", _positive_int, "an integer > 0"),
    ("sft.module.optimizer.lr", _positive, "a number > 0"),
    ("sft.batch_size", _positive_int, "an integer > 0"),
    ("sft.max_length", _sequence_length, _LENGTH),
    ("sft.max_epochs", _positive_int, "an integer > 0"),
    ("policy.steps", _positive_int, "an integer > 0"),
    ("policy.prompts_per_step", _positive_int, "an integer > 0"),
    ("policy.optimizer.lr", _positive, "a number > 0"),
    ("policy.generation.temperature", _positive, "a number > 0"),
    ("policy.generation.max_new_tokens", _positive_int, "an integer > 0"),
    ("policy.generation.max_prompt_length", _null_or_positive_int, "null or an integer > 0"),
    ("policy.eval_samples", _positive_int, "an integer > 0"),
    ("reward.max_length", lambda x: x is None or _sequence_length(x), _LENGTH),
    ("dpo.beta", _positive, "a number > 0"),
    ("policy.reference", lambda x: x in ("sft", "checkpoint"), "sft or checkpoint"),
    ("dpo.reference", lambda x: x in ("sft", "checkpoint"), "sft or checkpoint"),
    ("dpo.loss_type", lambda x: x in DPO_LOSSES, f"one of {list(DPO_LOSSES)}"),
    ("dpo.label_smoothing", lambda x: _number(x) and 0 <= x < 0.5, "a number in [0, 0.5)"),
    ("dpo.margin", _non_negative, "a number >= 0"),
    ("dpo.module.optimizer.lr", _positive, "a number > 0"),
    ("dpo.batch_size", _positive_int, "an integer > 0"),
    ("dpo.max_length", _sequence_length, _LENGTH),
    ("dpo.max_epochs", _positive_int, "an integer > 0"),
    ("dpo.eval_samples", _positive_int, "an integer > 0"),
    ("policy.exact_reward", lambda x: x in ("gold", "preference"), "'gold' or 'preference'"),
    ("model.dtype", lambda x: x in DTYPES, f"one of {list(DTYPES)}"),
    ("algo.name", lambda x: x in ALGORITHMS, f"one of {list(ALGORITHMS)}"),
    ("algo.beta", _non_negative, "a number >= 0"),
    ("algo.group_size", _positive_int, "an integer > 0"),
    ("algo.epochs", _positive_int, "an integer > 0"),
    ("algo.minibatches", _positive_int, "an integer > 0"),
    ("algo.clip_range", _positive, "a number > 0"),
    ("kl.estimator", lambda x: x in KL_ESTIMATORS, f"one of {list(KL_ESTIMATORS)}"),
    ("kl.penalty", lambda x: x in ("token", "sequence"), "'token' or 'sequence'"),
    ("kl_controller.epsilon", _positive, "a number > 0 (the KL budget in nats)"),
    ("kl_controller.target", _positive, "a number > 0 (the target KL in nats)"),
    ("kl_controller.horizon", _positive_int, "an integer > 0"),
    ("kl_controller.lr", _positive, "a number > 0"),
    ("data.val_fraction", _fraction, "a number in (0, 1)"),
    ("data.on_bad_row", lambda x: x in ("error", "skip"), "'error' or 'skip'"),
    ("data.max_chars", lambda x: x is None or _positive_int(x), "null or an integer > 0"),
    *[  # micro-batching (rlhf_lightning/microbatch.py): null = the whole batch at once
        (f"{stage}.{key}", _null_or_positive_int, "null or an integer > 0")
        for stage in ("sft", "rm", "policy", "dpo")
        for key in ("micro_batch_size", "max_tokens_per_micro_batch")
    ],
    ("policy.forward_batch_size", _null_or_positive_int, "null or an integer > 0"),
    *[
        (f"{s}.max_grad_norm", lambda x: x is None or _positive(x), "null or a number > 0")
        for s in ("sft", "rm", "policy", "dpo")
    ],
    ("model.gradient_checkpointing", lambda x: isinstance(x, bool), "true or false"),
    *[
        (f"{s}.shared_prefix", lambda x: isinstance(x, bool), "true or false")
        for s in ("rm", "policy")
    ],
    ("rm.length_group", _positive_int, "an integer > 0 (1: a plain shuffle)"),
    ("rm.init_from_sft", lambda x: isinstance(x, bool), "true or false"),
    ("rm.score_init_std", lambda x: x is None or _non_negative(x), "null or a number >= 0"),
    ("rm.num_layers", _null_or_positive_int, "null or an integer >= 1"),
    ("rm.trainable_layers", _null_or_positive_int, "null or an integer >= 1"),
    ("rm.keep", lambda x: x in KEEP, f"one of {list(KEEP)}"),
    ("rm.monitor", lambda x: x in MONITORS, f"one of {list(MONITORS)}"),
    (
        "rm.module.no_decay",
        lambda x: OmegaConf.is_list(x) and set(x) <= set(DECAY_EXCLUSIONS),
        f"a list of {list(DECAY_EXCLUSIONS)} (may be empty)",
    ),
]


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for the first impossible value in `cfg`."""
    _require_no_missing(cfg)
    stages = _get(cfg, "stage.stages")
    if not stages or any(s not in STAGES for s in stages):
        raise ConfigError(f"stage.stages={stages}: each stage must be one of {list(STAGES)}")
    for key, check, expected in RULES:
        value = _get(cfg, key)
        if value is _ABSENT:
            continue
        if not check(value):
            raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")
    _check_combinations(cfg)


def validate_eval(cfg: DictConfig) -> None:
    """eval.py's `validate`: one ConfigError line for the first missing or impossible value of
    `conf/eval.yaml`."""
    _require_no_missing(cfg)
    if cfg.mode not in ("policy", "rm"):
        raise ConfigError(f"mode={cfg.mode!r} is invalid: expected 'policy' or 'rm'")
    positive = {
        "samples_per_prompt": cfg.samples_per_prompt,
        "batch_size": cfg.batch_size,
        "bootstrap.n_resamples": cfg.bootstrap.n_resamples,
        "best_of_n.max_samples": cfg.best_of_n.max_samples,
        "best_of_n.n_prompts": cfg.best_of_n.n_prompts,
        "degenerate_ngram": cfg.degenerate_ngram,
        "calibration_bins": cfg.calibration_bins,
        "generation.max_new_tokens": cfg.generation.max_new_tokens,
        "n_prompts": 1 if cfg.n_prompts is None else cfg.n_prompts,
    }
    for key, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer > 0")
    if not cfg.generation.temperature > 0:
        raise ConfigError(f"generation.temperature={cfg.generation.temperature!r}: expected > 0")


def _require_no_missing(cfg: DictConfig) -> None:
    """The first `???` value, read without resolving interpolations (`OmegaConf.missing_keys`
    resolves them all, and a recipe's `${bf16_if_native:…}` would import torch to do so)."""
    raw = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    missing = sorted(k for k in _missing_keys(raw) if not k.startswith("hydra"))
    if missing:
        raise ConfigError(
            f"{missing[0]} is required (???): set it on the command line, {missing[0]}=..."
        )


def _missing_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        items = ((f"{prefix}.{k}" if prefix else str(k), v) for k, v in node.items())
    elif isinstance(node, list):
        items = ((f"{prefix}[{i}]", v) for i, v in enumerate(node))
    else:
        return [prefix] if node == "???" else []
    return [key for name, value in items for key in _missing_keys(value, name)]


def _check_combinations(cfg: DictConfig) -> None:
    """Rules that involve more than one key."""
    name, k = _get(cfg, "algo.name"), _get(cfg, "algo.group_size")
    if name in ("rloo", "grpo") and isinstance(k, int) and k < 2:
        raise ConfigError(
            f"algo.group_size={k} is invalid for algo={name}: it needs >= 2 samples per prompt"
        )
    _check_processes(cfg)
    for stage in ("policy", "dpo"):
        tiny = _get(cfg, "model.name_or_path") is None
        if (
            stage in _get(cfg, "stage.stages")
            and _get(cfg, f"{stage}.reference") == "checkpoint"
            and tiny
        ):
            raise ConfigError(
                f"{stage}.reference=checkpoint needs a pretrained model (model=smollm2, or model=hf "
                f"model.name_or_path=…): model=tiny has random weights; use {stage}.reference=sft"
            )
    lora = _get(cfg, "model.lora")
    if lora is not _ABSENT and lora is not None:
        from rlhf_lightning.models.lora import lora_settings

        lora_settings(lora)  # one ConfigError line naming model.lora.<key>
    _check_rm_speed_options(cfg)
    if name == "exact" and "policy" in (_get(cfg, "stage.stages") or []):
        target = str(_get(cfg, "task._target_"))
        if (
            _get(cfg, "data._target_")
            and "TaskData" in str(_get(cfg, "data._target_"))
            and "Oracle" not in target
        ):
            raise ConfigError("algo=exact needs an enumerable task: use task=oracle")


def _check_rm_speed_options(cfg: DictConfig) -> None:
    """rm.lora is validated as model.lora is; it and rm.trainable_layers exclude each other."""
    lora, layers = _get(cfg, "rm.lora"), _get(cfg, "rm.trainable_layers")
    if lora is _ABSENT or lora is None:
        return
    from rlhf_lightning.models.lora import lora_settings

    try:
        lora_settings(lora)
    except ConfigError as err:
        raise ConfigError(str(err).replace("model.lora", "rm.lora")) from None
    if layers not in (_ABSENT, None):
        raise ConfigError(
            f"rm.lora and rm.trainable_layers={layers} are both set: choose one (null the other)"
        )


def _check_processes(cfg: DictConfig) -> None:
    """Several processes (trainer=ddp): every global batch must give each rank a share."""
    devices, nodes = _get(cfg, "trainer.devices"), _get(cfg, "trainer.num_nodes")
    if isinstance(devices, list):
        devices = len(devices)
    if not _positive_int(devices):
        return  # "auto" / -1: Lightning decides; checked by Lightning itself
    world = devices * (nodes if _positive_int(nodes) else 1)
    if world == 1:
        return
    for key in ("sft.batch_size", "rm.batch_size", "dpo.batch_size", "policy.prompts_per_step"):
        value = _get(cfg, key)
        if _positive_int(value) and value < world:
            raise ConfigError(
                f"{key}={value} is smaller than the {world} processes (trainer.devices × "
                f"num_nodes); batch sizes are global, so set {key} >= {world}"
            )
    from rlhf_lightning.loggers import in_multirun

    external = any(v in os.environ for v in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"))
    if in_multirun() and not external:
        raise ConfigError(
            f"trainer.devices={devices} inside a Hydra multirun: Lightning cannot start processes "
            "for a sweep job — run sweeps with trainer.devices=1, or launch each job on a cluster "
            "(hydra/launcher=slurm gives each job its own processes)"
        )


_ABSENT = object()


def _get(cfg: DictConfig, key: str):
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{key} is required (???): set it on the command line, {key}=..."
        ) from err
    except InterpolationResolutionError as err:
        raise ConfigError(f"{key}: {err}") from err
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
