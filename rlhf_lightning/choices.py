"""The names a config value may take, in a module that imports nothing.

`config.validate` checks a composed config against these at start-up, before torch, transformers
or Lightning are imported, so a mistyped value fails in under 2 s instead of after ~12 s of
imports. The modules that implement the names import their tuple from here: one list to extend.
"""

STAGES = ("sft", "rm", "policy", "dpo")
ALGORITHMS = ("ppo", "rloo", "grpo", "reinforce", "exact")  # modules.algorithm
KL_ESTIMATORS = ("k1", "k2", "k3")  # losses.kl
DPO_LOSSES = ("sigmoid", "ipo", "robust")  # losses.dpo
DTYPES = ("float32", "bfloat16", "float16")  # torch dtypes by name: models.factory.DTYPES
# parameter kinds `no_decay` may name (modules.optim), trained without weight decay as TRL / the HF
# Trainer do: decay shrinks a norm's gain or a bias towards 0, which is not a simpler model, and
# decays an embedding row at every step whether its token appears in the batch or not
DECAY_EXCLUSIONS = ("bias", "norm", "embedding")
# which weights a stage's artifact holds (stages.common.best_weights): `last` (where training
# ended) or `best` (the validation with the best monitor; the monitor's direction per name)
KEEP = ("last", "best")
MONITORS = {"val/loss": "min", "val/accuracy": "max"}
