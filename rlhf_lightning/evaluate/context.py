"""What an evaluation reads: the data, checkpoints (ours or any `save_pretrained` folder), judges.

`EvalContext` is a `rewards.base.RewardContext`, as a training run's context is (`.data`,
`.model_spec`, `.artifact(stage)`, `.tokenizer`), so `reward=learned|gold|ensemble` set up exactly
as in training. A checkpoint is any folder (or Hub name) that `from_pretrained` reads, loaded under the
`model` config's rules (dtype, `trust_remote_code`); our artifacts are only the default paths.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from rlhf_lightning.artifacts import read_manifest, require_artifact
from rlhf_lightning.data.spec import DataSpec
from rlhf_lightning.errors import ArtifactError, ConfigError, DataError
from rlhf_lightning.models.factory import ModelSpec
from rlhf_lightning.rewards.ensemble import EnsembleReward
from rlhf_lightning.rewards.learned import LearnedReward

# which stage writes each default checkpoint, and the command that makes it
DEFAULTS = {
    "policy": ("policy", "python train.py"),
    "reference": ("sft", "python train.py stage=sft"),
    "reward_model": ("rm", "python train.py stage=rm"),
}


class EvalContext:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.data: DataSpec = instantiate(cfg.data)
        self.model_spec: ModelSpec = instantiate(cfg.model)
        self.artifacts_dir = Path(cfg.paths.artifacts_dir) / self.data.name
        self.output_dir = Path(cfg.paths.output_dir)
        self.tokenizer = None  # the policy's, once loaded (a learned judge reads its stop tokens)

    @property
    def task(self):
        return self.data.task

    def artifact(self, stage: str) -> Path:
        """Where training saved `stage` (what `LearnedReward.setup` reads for the RM)."""
        if stage == "rm" and self.cfg.checkpoints.reward_model:
            return Path(self.cfg.checkpoints.reward_model)
        return self.artifacts_dir / stage

    def checkpoint(self, role: str) -> str:
        """The folder or Hub name of `role` (policy | reference | compare | reward_model)."""
        given = self.cfg.checkpoints.get(role)
        if given:
            if Path(given).exists() and not (Path(given) / "config.json").exists():
                raise ArtifactError(
                    f"{role}={given} is not a model folder (no config.json): pass a folder "
                    "written by save_pretrained"
                )
            return str(given)
        if role == "reference":  # the one the policy was trained against, as its manifest says
            recorded = read_manifest(Path(self.checkpoint("policy"))).get("reference_path")
            if recorded and (Path(recorded) / "config.json").exists():
                return str(recorded)
        stage, command = DEFAULTS[role]
        return str(require_artifact(self.artifacts_dir / stage, role, command))

    def load_tokenizer(self, path: str):
        """The checkpoint's own tokenizer; a missing pad token becomes EOS (nothing is trained)."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                path, trust_remote_code=self.model_spec.trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise ArtifactError(
                f"cannot load a tokenizer from '{path}': {err}. Save one beside the weights "
                "(tokenizer.save_pretrained(folder))"
            ) from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def causal_lm(self, path: str, tokenizer):
        return self.model_spec.causal_lm(tokenizer, path=path).eval().requires_grad_(False)

    def judges(self) -> dict:
        """name → reward function: the configured `reward` (and an ensemble's members), plus the
        task's gold reward where it has one. The first is the proxy (what best-of-n ranks by)."""
        reward = instantiate(self.cfg.reward)
        found = dict(reward.members) if isinstance(reward, EnsembleReward) else {}
        judges = {reward.name: reward, **found}
        for judge in judges.values():
            judge.setup(self)
        if self.task is not None and "gold" not in judges:
            judges["gold"] = _Gold(self.task)
        return judges

    def reward_model(self) -> LearnedReward:
        """The learned RM of `mode=rm`, unnormalised (Bradley–Terry margins are probabilities)."""
        return LearnedReward(normalise=False, max_length=self.cfg.rm_max_length).setup(self)

    def prompts(self) -> list[str]:
        """The prompts to evaluate on: `prompts=FILE`, else the data's held-out prompts;
        conversational ones rendered with the policy's chat template (as training rendered them)."""
        from rlhf_lightning.data.records import load_prompts

        source, tokenizer = self.cfg.prompts, self.tokenizer
        if source:
            records = load_prompts(
                source, tokenizer=tokenizer, on_bad_row=self.cfg.data.on_bad_row
            ).records
        else:
            records = self.data.load("prompts", "eval", tokenizer).records
        prompts = [r.prompt for r in records][: self.cfg.n_prompts or None]
        if not prompts:
            raise DataError("no prompts to evaluate on", where=str(source or self.data.name))
        return prompts

    def pairs(self, tokenizer) -> list:
        """Preference pairs of `mode=rm`: `pairs=FILE`, else the task's test split (data=jsonl:
        the held-out pairs of data.path); conversational ones rendered with `tokenizer`'s chat
        template (the reward model's: as its training rendered them)."""
        from rlhf_lightning.data.records import load_preferences

        if self.cfg.pairs:
            on_bad_row = self.cfg.data.on_bad_row
            return load_preferences(
                self.cfg.pairs, tokenizer=tokenizer, on_bad_row=on_bad_row
            ).records
        split = "test" if self.task is not None else "val"
        return self.data.load("prefs", split, tokenizer).records

    def label_temperature(self) -> float | None:
        """τ of the task's Bradley–Terry labels (card.json), for the Bayes ceiling."""
        directory = getattr(self.data, "directory", None)
        if self.task is None or directory is None:
            return None
        self.data.load("prefs", "test")  # writes the task files when missing
        return float(json.loads((Path(directory) / "card.json").read_text())["temperature"])


class _Gold:
    """The task's gold reward as a judge, without a run context."""

    name = "gold"

    def __init__(self, task):
        self.task = task

    def __call__(self, prompts, responses):
        return self.task.gold_reward(list(prompts), list(responses))


def check_same_vocabulary(tokenizer, other, roles: str) -> None:
    """KL and keyed sampling compare token by token: both sides need one vocabulary."""
    if tokenizer.get_vocab() != other.get_vocab():
        raise ConfigError(
            f"{roles} have different tokenizers ({len(tokenizer)} vs {len(other)} tokens): KL "
            "needs one vocabulary; pass a reference fine-tuned from the same base"
        )
