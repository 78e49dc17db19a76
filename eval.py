"""Entry point: `python eval.py` (the task's policy against its SFT reference), `python eval.py
mode=rm`, `python eval.py policy=DIR reference=DIR compare=DIR reward=gold data=jsonl …`.

Thin like `train.py`: Hydra composes `conf/eval.yaml`, `rlhf_lightning.evaluate.run.run_eval`
does the work. `policy=` names train.py's config group to Hydra, so checkpoint arguments
(`policy=`, `reference=`, `compare=`, `reward_model=`) are read as `checkpoints.<name>=` keys.
Errors a user can cause print as one line, exit code 2.
"""

import sys

import hydra
from omegaconf import DictConfig

from rlhf_lightning.errors import RLHFError

CHECKPOINTS = ("policy", "reference", "compare", "reward_model")


def checkpoint_overrides(args: list[str]) -> list[str]:
    """`policy=DIR` → `checkpoints.policy=DIR` (and the other checkpoint names); others as given."""
    return [f"checkpoints.{a}" if a.split("=", 1)[0] in CHECKPOINTS else a for a in args]


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from rlhf_lightning.evaluate.run import run_eval

    try:
        return run_eval(cfg)
    except RLHFError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv[1:] = checkpoint_overrides(sys.argv[1:])
    main()
