"""Start-up checks of the composed configuration: impossible values fail before any work starts.

Hydra already rejects unknown keys and unknown group options (the config is in struct mode); this
module checks values. Each rule names the key, what is wrong and what would be right, in one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from rlhf_lightning.errors import ConfigError

STAGES = ("sft", "rm", "policy")


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


# (key, check, what a valid value is)
RULES: list[tuple[str, Callable[[object], bool], str]] = [
    ("seed", lambda x: isinstance(x, int) and not isinstance(x, bool), "an integer"),
    ("rm.module.optimizer.lr", _positive, "a number > 0"),
    ("rm.module.centering", _non_negative, "a number >= 0"),
    ("rm.batch_size", _positive_int, "an integer > 0"),
    ("rm.max_length", _positive_int, "an integer > 0"),
    ("rm.max_epochs", _positive_int, "an integer > 0"),
    ("sft.module.optimizer.lr", _positive, "a number > 0"),
    ("sft.batch_size", _positive_int, "an integer > 0"),
    ("sft.max_length", _positive_int, "an integer > 0"),
    ("sft.max_epochs", _positive_int, "an integer > 0"),
    ("data.val_fraction", _fraction, "a number in (0, 1)"),
    ("data.on_bad_row", lambda x: x in ("error", "skip"), "'error' or 'skip'"),
    ("data.max_chars", lambda x: x is None or _positive_int(x), "null or an integer > 0"),
]


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for the first impossible value in `cfg`."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        raise ConfigError(f"{missing[0]} is required (???): set it on the command line, {missing[0]}=...")
    stages = _get(cfg, "stage.stages")
    if not stages or any(s not in STAGES for s in stages):
        raise ConfigError(f"stage.stages={stages}: each stage must be one of {list(STAGES)}")
    for key, check, expected in RULES:
        value = _get(cfg, key)
        if value is _ABSENT:
            continue
        if not check(value):
            raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


_ABSENT = object()


def _get(cfg: DictConfig, key: str):
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{key} is required (???): set it on the command line, {key}=...") from err
    except InterpolationResolutionError as err:
        raise ConfigError(f"{key}: {err}") from err
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
