"""`SFTDataModule`: (prompt, completion) demonstrations → batches with a response-only loss mask."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from rlhf_lightning.data.batching import LengthGroupedBatchSampler, ResumableSampling, pad
from rlhf_lightning.data.encoding import encode_sequences
from rlhf_lightning.data.spec import DataSpec


def encode_demonstration(tokenizer, record, max_length: int) -> dict:
    """ids = prompt + completion as `data/encoding.py` encodes them (the checkpoint's BOS and
    stop tokens); `response_mask` is 1 on completion tokens."""
    [(prompt, response)] = encode_sequences(
        tokenizer, [record.prompt], [record.completion], max_length
    )
    return {"ids": prompt + response, "response_mask": [0] * len(prompt) + [1] * len(response)}


class SFTCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids, attention_mask = pad([it["ids"] for it in items], self.pad_id)
        response_mask, _ = pad([it["response_mask"] for it in items], 0)
        return {"input_ids": ids, "attention_mask": attention_mask, "response_mask": response_mask}


class SFTDataModule(ResumableSampling, L.LightningDataModule):
    """Demonstrations of a `DataSpec` (train/val splits), length-grouped, dynamically padded;
    checkpoints carry the position in the training order (`ResumableSampling`)."""

    def __init__(self, data: DataSpec, tokenizer, batch_size=32, max_length=128, seed=0):
        super().__init__()
        self.data, self.tokenizer = data, tokenizer
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.datasets: dict[str, list[dict]] = {}

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val"):
            if split not in self.datasets:
                records = self.data.load("sft", split, self.tokenizer).records
                self.datasets[split] = [
                    encode_demonstration(self.tokenizer, r, self.max_length) for r in records
                ]

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        world, rank = (
            (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        )
        sampler = LengthGroupedBatchSampler(
            [len(x["ids"]) for x in dataset],
            self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
        )
        if split == "train":
            sampler = self._train_sampler(sampler)
        collate = SFTCollator(self.tokenizer.pad_token_id)
        generator = torch.Generator().manual_seed(self.seed)  # leaves the global RNG alone
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=generator)
