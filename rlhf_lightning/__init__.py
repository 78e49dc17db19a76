"""rlhf-lightning: RLHF as clean, swappable, verifiable parts on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
