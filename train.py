"""Entry point: `python train.py stage=rm`, `python train.py -m stage=policy algo.beta=0.01,0.1`.

Thin by design: Hydra composes the config, `rlhf_lightning.run.run` does the work and returns the
metric a sweeper optimises. Errors a user can cause print as one line, without a traceback.
"""

import sys
import traceback

import hydra
from omegaconf import DictConfig

from rlhf_lightning.errors import RLHFError
from rlhf_lightning.loggers import in_multirun


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from rlhf_lightning.run import run

    try:
        return run(cfg)
    except RLHFError as err:
        print(f"error: {err}", file=sys.stderr)
        if not in_multirun():
            sys.exit(2)
    except Exception:
        if not in_multirun():
            raise
        traceback.print_exc()
    # a failed job of a sweep: its result.json says so, the other jobs go on, the report marks it
    return None


if __name__ == "__main__":
    main()
