"""`PairUnits`: a unit of micro-batching is a preference pair (the RM and DPO stages).

A pair batch stacks the chosen sequences over the rejected ones (`data.preference`): rows
0..B-1 chosen, B..2B-1 rejected, [2B, T] each. A pair's two rows travel together into one
micro-batch, so a loss over pairs is the same whichever way the batch is cut.
"""

from __future__ import annotations

import torch

from rlhf_lightning.modules.supervised import trimmed

PAIR_ROWS = ("input_ids", "attention_mask", "response_mask")  # [2B, T] tensors of a pair batch


class PairUnits:
    """`units`, `unit_lengths`, `select` and `loss_count` of `MicroBatchedModule` for pair batches
    (mix in before it). `pair_columns`: the [B] per-pair tensors a micro-batch carries along
    (the RM's `margin`, DPO's `index`), where the batch has them."""

    pair_columns: tuple[str, ...] = ()

    def units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def unit_lengths(self, batch: dict) -> list[int]:
        """Padded tokens of a pair: both its sequences at the longer one's length, so a token
        budget counts every position a micro-batch's forward computes."""
        chosen, rejected = batch["attention_mask"].sum(-1).chunk(2)
        return (2 * torch.maximum(chosen, rejected)).tolist()

    def select(self, batch: dict, idx: torch.Tensor) -> dict:
        """Pairs `idx` [b]: their chosen rows, then their rejected rows, trimmed of padding."""
        rows = torch.cat([idx, idx + self.units(batch)])
        part = trimmed(batch, rows, tuple(k for k in PAIR_ROWS if k in batch))
        part.update({k: batch[k][idx] for k in self.pair_columns if k in batch})
        return part

    def loss_count(self, part: dict) -> int:
        return self.units(part)
