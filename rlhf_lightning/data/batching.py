"""Length-aware batching, dynamic padding and the truncation policy shared by SFT and the RM.

Truncation policy (one place, documented in README): a sequence is `prompt + response`, at most
`max_length` tokens. When too long, the prompt is cut from the LEFT (the words nearest the
response are kept; the BOS the tokenizer adds stays first), down to `max_length // 2` tokens at
most; if still too long the response is cut from the RIGHT and its final stop token (EOS, or a chat
template's end of turn) is kept, so the reward model always reads its score at the end of the
response.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterator, Sequence

import torch
from torch.utils.data import Sampler


def truncate(
    prompt: list[int],
    response: list[int],
    max_length: int,
    eos_id: int | Collection[int] | None,
    head: int = 1,
) -> tuple[list[int], list[int]]:
    """Apply the truncation policy above; returns (prompt_ids, response_ids), together at most
    `max_length` ids.

    eos_id: the id, or ids, a response may end with (EOS, a chat template's end of turn); a cut
    response keeps it last. head: leading prompt ids never cut (the BOS the tokenizer adds; 0
    when it adds none). With `max_length >= head + 3` a cut sequence keeps the head, one prompt
    token, one response token and the response's stop token.
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    head = min(head, len(prompt))
    floor = max_length // 2  # what the prompt may be cut to: half, but at least head + 1 token
    floor = min(len(prompt), max(floor, head + 1) if max_length >= head + 3 else floor)
    keep = min(len(prompt), max(max_length - len(response), floor, head), max_length)
    if keep < len(prompt):
        tail = keep - head
        prompt = prompt[:keep] if tail <= 0 else prompt[:head] + prompt[len(prompt) - tail :]
    room = max_length - len(prompt)
    if len(response) > room:
        ends = room > 0 and bool(response) and response[-1] in stops
        response = response[: room - 1] + response[-1:] if ends else response[:room]
    return prompt, response


def pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (ids [B, T], attention_mask [B, T])."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def response_mask(attention_mask: torch.Tensor, starts) -> torch.Tensor:
    """1 on the response tokens of right-padded prompt + response rows: attention_mask [N, T]
    where the position is at or past the row's prompt length `starts` [N] (a sequence or tensor)."""
    starts = torch.as_tensor(starts)
    return attention_mask * (torch.arange(attention_mask.shape[1]) >= starts[:, None])


def rank_slice(batch: list[int], num_replicas: int, rank: int) -> list[int]:
    """Rank `rank`'s contiguous share of a global batch (sizes differ by at most one)."""
    size, extra = divmod(len(batch), num_replicas)
    start = rank * size + min(rank, extra)
    return batch[start : start + size + (rank < extra)]


def rank_deal(batch: list[int], num_replicas: int, rank: int) -> list[int]:
    """Rank `rank`'s share of a length-sorted global batch, dealt like cards in alternating
    direction (ranks 0…W−1, then W−1…0, …): every rank gets a unit of each length band, and the
    ranks' token counts differ by at most the longest minus the shortest unit's length (a
    contiguous slice gives the last rank all the longest units: the straggler of every step).
    Sizes differ by at most one; the rank's units keep the batch's order."""
    rounds = [batch[i : i + num_replicas] for i in range(0, len(batch), num_replicas)]
    share = []
    for r, units in enumerate(rounds):
        seat = rank if r % 2 == 0 else num_replicas - 1 - rank
        if seat < len(units):
            share.append(units[seat])
    return share


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length (less padding), in a random order fixed by (seed, epoch).

    Indices are shuffled, cut into mega-batches of `group * batch_size`, sorted by length inside
    each, cut into batches, and the batches shuffled again. `batch_size` is the GLOBAL batch: with
    `num_replicas > 1` each rank takes its share of every batch, so the union of the ranks'
    batches at a step is exactly the batch one process would see (a last batch smaller than
    `num_replicas` is dropped, so no rank is ever empty) and training does not depend on the
    number of processes. deal: shares dealt from the length-sorted batch (`rank_deal`, ranks
    balanced in tokens); False: contiguous slices in rank order (`rank_slice`), for consumers
    that index the global batch in rank order (the policy's prompts: `rollout.minibatch_rows`).
    `state_dict` records the epoch and how many batches were consumed, for exact mid-epoch resume.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        group: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
        deal: bool = True,
    ):
        self.lengths, self.batch_size, self.shuffle = list(lengths), batch_size, shuffle
        self.seed, self.group = seed, group
        self.num_replicas, self.rank = num_replicas, rank
        self.share = rank_deal if deal else rank_slice
        self.epoch, self.consumed = 0, 0

    def _all_batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        span = self.group * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [
                chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
            ]
        if self.shuffle:
            rng.shuffle(batches)
        if self.num_replicas == 1:
            return batches
        # every rank needs a non-empty slice of every batch, or collectives would not line up
        batches = [b for b in batches if len(b) >= self.num_replicas]
        return [self.share(b, self.num_replicas, self.rank) for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        # A finished pass is noticed here, not after the last yield: loaders that know the length
        # never resume the generator past its last batch.
        batches = self._all_batches()
        if not self.shuffle:
            self.consumed = 0
        elif self.consumed >= len(batches):
            self.epoch, self.consumed = self.epoch + 1, 0
            batches = self._all_batches()
        while self.consumed < len(batches):
            batch = batches[self.consumed]
            self.consumed += 1
            yield batch

    def __len__(self) -> int:
        return len(self._all_batches())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def trained_position(trainer, sampler: LengthGroupedBatchSampler | None) -> dict:
    """The sampler state a checkpoint must hold: where training, not the loader, has got to.

    A DataLoader with workers draws `prefetch_factor × num_workers` batches ahead of training (and
    Lightning prefetches one batch from loaders without a length), so when a checkpoint is written
    the sampler may have handed out batches no step has seen. The fit loop's
    `batch_progress.current.processed` counts this epoch's batches that went through a training
    step: a checkpoint written in `on_train_batch_end` counts the current batch, one written after
    a failed step does not, and Lightning 2.6 resumes right after those it counts. The epoch is the
    trainer's. Assumes one trainer epoch is one pass of the sampler (no `limit_train_batches`).
    """
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or sampler is None:
        return sampler.state_dict() if sampler is not None else {}
    processed = loop.epoch_loop.batch_progress.current.processed
    return {"epoch": int(trainer.current_epoch), "consumed": int(processed)}


class ResumableSampling:
    """Datamodule mixin: checkpoints carry the training sampler's position, restored on resume.

    Lightning saves `datamodule.state_dict()` in every checkpoint and calls `load_state_dict` on
    resume before it asks for the train dataloader; the position is applied to the sampler built
    then, so the resumed run sees exactly the batches the uninterrupted run would have seen.
    """

    sampler: LengthGroupedBatchSampler | None = None
    _resume_state: dict | None = None

    def state_dict(self) -> dict:
        if self.sampler is None:
            return {}
        return {"sampler": trained_position(getattr(self, "trainer", None), self.sampler)}

    def load_state_dict(self, state: dict) -> None:
        self._resume_state = state.get("sampler")

    def _train_sampler(self, sampler: LengthGroupedBatchSampler) -> LengthGroupedBatchSampler:
        """Keep `sampler` as the training sampler, moved to the resumed position if there is one."""
        if self._resume_state is not None:
            sampler.load_state_dict(self._resume_state)
            self._resume_state = None
        self.sampler = sampler
        return sampler
