"""`PromptDataModule`: the prompt stream of the policy stage (a batch is a list of prompt strings).

The order is a fixed shuffle per (seed, epoch), and checkpoints record how far training got in it
(`ResumableSampling`), so a resumed run continues the stream where it stopped. `prompts_per_step`
is global: with several processes each rank takes its slice of every step's prompts. A batch
carries each prompt's index in the prompt set, which keys its samples' random draws, so a sample
does not depend on which rank draws it.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from rlhf_lightning.data.batching import LengthGroupedBatchSampler, ResumableSampling
from rlhf_lightning.data.spec import DataSpec
from rlhf_lightning.errors import DataError


def _collate(items: list[tuple[int, str]]) -> dict:
    """{"prompts": [B] text, "index": [B] their positions in the prompt set (sampling keys)}."""
    return {
        "prompts": [prompt for _, prompt in items],
        "index": torch.tensor([i for i, _ in items], dtype=torch.long),
    }


class PromptDataModule(ResumableSampling, L.LightningDataModule):
    def __init__(self, data: DataSpec, tokenizer, prompts_per_step: int = 16, seed: int = 0):
        super().__init__()
        self.data, self.tokenizer = data, tokenizer
        self.prompts_per_step, self.seed = prompts_per_step, seed
        self.prompts: dict[str, list[str]] = {}
        self.sampler: LengthGroupedBatchSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "eval"):
            if split not in self.prompts:
                # with the tokenizer: conversational prompts render with its chat template
                records = self.data.load("prompts", split, self.tokenizer).records
                self.prompts[split] = [r.prompt for r in records]
        if len(self.prompts["train"]) < self.prompts_per_step:
            raise DataError(
                f"{len(self.prompts['train'])} training prompts, fewer than "
                f"policy.prompts_per_step={self.prompts_per_step}",
                fix="lower policy.prompts_per_step or add prompts",
            )

    def train_dataloader(self) -> DataLoader:
        world, rank = (
            (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        )
        train = self.prompts["train"]
        sampler = LengthGroupedBatchSampler(
            [1] * len(train),
            self.prompts_per_step,
            shuffle=True,
            seed=self.seed,
            group=1,
            num_replicas=world,
            rank=rank,
            deal=False,  # PPO's minibatches index the global batch in rank order (minibatch_rows)
        )
        generator = torch.Generator().manual_seed(self.seed)  # leaves the global RNG alone
        return DataLoader(
            list(enumerate(train)),
            batch_sampler=self._train_sampler(sampler),
            collate_fn=_collate,
            generator=generator,
        )
