"""Everything logged beyond the loss: KL, preference accuracy, over-optimisation, optimum gap.

One callback per file and one YAML per callback in `conf/callbacks/`; each has a `stages` attribute
naming the stages it runs in (`rlhf_lightning.run` drops the others).
"""

from rlhf_lightning.callbacks.best_of_n import BestOfNCallback
from rlhf_lightning.callbacks.gold_accuracy import GoldAccuracyCallback
from rlhf_lightning.callbacks.kl import KLCallback
from rlhf_lightning.callbacks.optimum_gap import OptimumGapCallback
from rlhf_lightning.callbacks.overoptimisation import OverOptimisationCallback
from rlhf_lightning.callbacks.preference_accuracy import PreferenceAccuracyCallback
from rlhf_lightning.callbacks.samples import SamplesCallback

__all__ = [
    "BestOfNCallback",
    "GoldAccuracyCallback",
    "KLCallback",
    "OptimumGapCallback",
    "OverOptimisationCallback",
    "PreferenceAccuracyCallback",
    "SamplesCallback",
]
