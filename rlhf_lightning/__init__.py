"""rlhf-lightning: RLHF as clean, swappable, verifiable parts on PyTorch Lightning and Hydra."""

import logging as _logging
import os as _os

__version__ = "0.1.0"

# Set before anything imports wandb, tokenizers or huggingface_hub (a user's environment wins).
_os.environ.setdefault("WANDB_SILENT", "true")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Importing Lightning imports matplotlib (through torchmetrics), which logs "generated new
# fontManager" at INFO on a machine's first run, and Hydra's job logging prints INFO: known noise,
# silenced before anything imports matplotlib (`rlhf_lightning.run.quiet_third_party` has the rest).
_logging.getLogger("matplotlib").setLevel(_logging.WARNING)

# `${bf16_if_native:${trainer.accelerator}}` in configs (the recipes' trainer.precision): registered
# on import, before Hydra resolves anything, as train.py and eval.py import this package first.
from omegaconf import OmegaConf as _OmegaConf  # noqa: E402

from rlhf_lightning.precision import bf16_if_native as _bf16_if_native  # noqa: E402

_OmegaConf.register_new_resolver("bf16_if_native", _bf16_if_native, replace=True)
