"""`PreferenceDataModule`: (prompt, chosen, rejected) pairs → batches scored in one forward pass.

A batch stacks the chosen sequences over the rejected ones: `input_ids` is [2B, T] with rows
0..B-1 chosen and B..2B-1 rejected, so the reward model scores both in a single pass.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from rlhf_lightning.data.batching import (
    LengthGroupedBatchSampler,
    ResumableSampling,
    pad,
    response_mask,
)
from rlhf_lightning.data.encoding import encode_sequences
from rlhf_lightning.data.spec import DataSpec


def encode_pair(tokenizer, record, max_length: int) -> dict:
    """Token ids of both sides of one preference record, truncated by the shared policy."""
    (pc, rc), (pr, rr) = encode_sequences(
        tokenizer, [record.prompt] * 2, [record.chosen, record.rejected], max_length
    )
    margin = record.margin if record.margin is not None else 0.0
    # each side's prompt length: truncation may cut the prompt differently beside each response
    sides = {"chosen": pc + rc, "rejected": pr + rr, "prompt_lengths": (len(pc), len(pr))}
    return {**sides, "margin": float(margin)}


class PreferenceCollator:
    """Dynamic padding of encoded pairs into one [2B, T] batch (chosen rows first), with the
    `response_mask` [2B, T] (1 on response tokens; DPO scores log p(y|u) with it) and, when the
    pairs carry one, each pair's `index` [B] (`PreferenceDataModule.setup`: DPO's reference
    log-probs are looked up by it)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad(
            [it["chosen"] for it in items] + [it["rejected"] for it in items], self.pad_id
        )
        margin = torch.tensor([it["margin"] for it in items], dtype=torch.float32)
        starts = [it["prompt_lengths"][side] for side in (0, 1) for it in items]  # [2B]
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "response_mask": response_mask(mask, starts),
            "margin": margin,
        }
        if all("index" in it for it in items):
            batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return batch


class PreferenceDataModule(ResumableSampling, L.LightningDataModule):
    """Preference pairs of a `DataSpec` for reward-model and DPO training and validation
    (checkpoints carry the position in the training order: `ResumableSampling`).

    eval_prompts: also load the held-out prompts into `prompts["eval"]`, where the evaluation
    callbacks sample from (the DPO stage; `PromptDataModule` has the same attribute).
    length_group: training batches per length-sorted mega-batch (`LengthGroupedBatchSampler`
    `group`); 1 is a plain shuffle, every batch a uniform sample of the pairs."""

    def __init__(
        self,
        data: DataSpec,
        tokenizer,
        batch_size: int = 32,
        max_length: int = 128,
        seed: int = 0,
        num_workers: int = 0,
        eval_prompts: bool = False,
        length_group: int = 50,
    ):
        super().__init__()
        self.data, self.tokenizer = data, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.seed, self.num_workers = seed, num_workers
        self.eval_prompts = eval_prompts
        self.length_group = length_group
        self.datasets: dict[str, list[dict]] = {}
        self.prompts: dict[str, list[str]] = {}
        self.sampler: LengthGroupedBatchSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        """Encode the train and val pairs; each carries an `index`, its position in train + val."""
        for split in ("train", "val"):
            if split not in self.datasets:
                records = self.data.load("prefs", split, self.tokenizer).records
                self.datasets[split] = [
                    encode_pair(self.tokenizer, r, self.max_length) for r in records
                ]
        start = 0
        for split in ("train", "val"):
            for i, pair in enumerate(self.datasets[split]):
                pair["index"] = start + i
            start += len(self.datasets[split])
        if self.eval_prompts and "eval" not in self.prompts:
            records = self.data.load("prompts", "eval", self.tokenizer).records
            self.prompts["eval"] = [r.prompt for r in records]

    def train_dataloader(self) -> DataLoader:
        train = self.datasets["train"]
        world, rank = _world(self.trainer)
        sampler = LengthGroupedBatchSampler(
            [max(len(x["chosen"]), len(x["rejected"])) for x in train],
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            group=self.length_group,
            num_replicas=world,
            rank=rank,
        )
        return self._loader(train, self._train_sampler(sampler))

    def val_dataloader(self) -> DataLoader:
        val = self.datasets["val"]
        world, rank = _world(self.trainer)
        sampler = LengthGroupedBatchSampler(
            [max(len(x["chosen"]), len(x["rejected"])) for x in val],
            self.batch_size,
            shuffle=False,
            num_replicas=world,
            rank=rank,
        )
        return self._loader(val, sampler)

    def _loader(self, dataset, sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=PreferenceCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # leaves the global RNG alone
        )


def _world(trainer) -> tuple[int, int]:
    if trainer is None:
        return 1, 0
    return trainer.world_size, trainer.global_rank
