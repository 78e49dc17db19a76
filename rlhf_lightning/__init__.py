"""rlhf-lightning: RLHF as clean, swappable, verifiable parts on PyTorch Lightning and Hydra."""

import logging as _logging

__version__ = "0.1.0"

# Importing Lightning imports matplotlib (through torchmetrics), which logs "generated new
# fontManager" at INFO on a machine's first run, and Hydra's job logging prints INFO: known noise,
# silenced before anything imports matplotlib (`rlhf_lightning.run.quiet_third_party` has the rest).
_logging.getLogger("matplotlib").setLevel(_logging.WARNING)
