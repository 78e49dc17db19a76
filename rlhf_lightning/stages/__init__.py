"""One function per stage: `run_<stage>(ctx) -> metrics`, composed by `rlhf_lightning.run`."""

from rlhf_lightning.stages.dpo import run_dpo
from rlhf_lightning.stages.policy import run_policy
from rlhf_lightning.stages.rm import run_rm
from rlhf_lightning.stages.sft import run_sft

STAGE_RUNNERS = {"sft": run_sft, "rm": run_rm, "policy": run_policy, "dpo": run_dpo}
