"""`DPOModule`: direct preference optimisation of p_θ from preference pairs and a frozen reference.

    L(θ) = mean over pairs of ℓ(ρ⁺, ρ⁻),   ρ± = log p_θ(y±|u) − log p_ref(y±|u)

with ℓ the sigmoid (DPO), IPO or robust loss of `losses/dpo.py` (Rafailov et al. 2023,
https://arxiv.org/abs/2305.18290). A sibling of `RewardModelModule`: one optimiser step per batch
of pairs in micro-batches of pairs (`MicroBatchedModule`), chosen rows then rejected rows in one
[2B, T] batch, log p(y|u) from `response_logprobs` (logits at response positions only). With
`shared_prefix` a pair's prompt runs once for both responses (`shared_prefix.regroup` lays each
pair out as [left-padded prompt | responses], `shared_prefix.shared_prefix_states` runs the
responses against the prompt's expanded KV cache): the same log-probs and gradients, fewer tokens
(a SmolLM2 chat pair: ~45 prompt tokens, ~40 per response).

The reference never changes, so with `precompute_ref_logprobs` its log p(y|u) of every training
and validation pair is computed once before training (as TRL's `precompute_ref_log_probs`), under
the precision context of the training step's forward (bf16 autocast under `bf16-mixed`, as the
policy's pass, so ρ = 0 at step 0), and looked up by the pair's index (`batch["index"]`, its
position in train + val): a [P, 2] float32 table, 800 kB at 100k pairs, the same on every rank,
each rank scoring its own share of the pairs and the shares summed over ranks. Without it, the
reference is recomputed in each micro-batch (no grad).

For the evaluation callbacks it has what `PolicyModule` has: `.policy`, `.reference`, `.reward`
(the proxy: the learned RM when given, else the task's gold), `.tokenizer`, `.generation`,
`.beta` (a fixed β), `.exact` (on `task=oracle`, exact J, J* and KL to p_DPO*).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torchmetrics import MeanMetric

from rlhf_lightning.control.beta import FixedBeta
from rlhf_lightning.distributed import all_reduce_sum, rank, world_size
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.losses.dpo import DPO_LOSSES, dpo_loss, implicit_accuracy
from rlhf_lightning.microbatch import chunked
from rlhf_lightning.models.factory import train_without_dropout
from rlhf_lightning.models.logprobs import pair_logprobs, response_logprobs
from rlhf_lightning.modules.pairs import PAIR_ROWS, PairUnits
from rlhf_lightning.modules.supervised import MicroBatchedModule, trimmed

VAL_KEYS = ("loss", "implicit_accuracy", "implicit_margin", "logratio_chosen", "logratio_rejected")


class DPOModule(PairUnits, MicroBatchedModule):
    """policy: HF causal LM (trained); reference: the frozen SFT model (or the LoRA policy with its
    adapter off). beta: β > 0. loss_type: sigmoid | ipo | robust. label_smoothing: ε (sigmoid:
    cDPO, robust: the assumed flip rate). margin: γ (sigmoid). precompute_ref_logprobs: score the
    reference once per pair. disable_dropout: train in eval mode, as TRL (so ρ = 0 at step 0).
    forward_batch_size: pairs per no-grad reference pass. shared_prefix: a pair's prompt once for
    both responses (same numbers). Micro-batching: `MicroBatchedModule`, a unit a pair
    (`PairUnits`, carrying its `index`)."""

    stage_name = "dpo"
    pair_columns = ("index",)
    loss_name = "DPO"
    numerical_fix = "lower dpo.module.optimizer.lr"

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module,
        tokenizer,
        optimizer: Callable,
        scheduler: Callable | None = None,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        margin: float = 0.0,
        precompute_ref_logprobs: bool = True,
        disable_dropout: bool = True,
        generation: GenerationSettings | None = None,
        reward: Callable | None = None,
        exact=None,
        forward_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
        max_grad_norm: float | None = None,
        shared_prefix: bool = True,
    ):
        super().__init__(
            optimizer, scheduler, micro_batch_size, max_tokens_per_micro_batch, max_grad_norm
        )
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"loss_type={loss_type!r}: expected one of {list(DPO_LOSSES)}")
        self.save_hyperparameters(
            ignore=["policy", "reference", "tokenizer", "optimizer", "scheduler", "generation"]
            + ["reward", "exact"]
        )
        self.policy, self.tokenizer = policy, tokenizer
        # frozen, outside the optimiser and the state dict (as in PolicyModule)
        self._frozen = {"reference": reference.eval().requires_grad_(False), "reward": reward}
        self.beta = FixedBeta(beta)
        self.generation = generation or GenerationSettings()
        self.exact, self.forward_batch_size = exact, forward_batch_size
        # [P, 2] log p_ref(y⁺|u), log p_ref(y⁻|u) by pair index (NaN: not scored yet)
        self.reference_table: torch.Tensor | None = None
        self.val = nn.ModuleDict({key: MeanMetric() for key in VAL_KEYS})
        self.val_reward_chosen, self.val_reward_rejected = MeanMetric(), MeanMetric()

    @property
    def reference(self) -> nn.Module:
        return self._frozen["reference"]

    @property
    def reward(self) -> Callable | None:
        return self._frozen["reward"]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """The loss terms of a [2B, T] pair batch: `losses.dpo.dpo_loss`'s keys, plus the
        implicit-reward accuracy and margin (means over the pairs)."""
        mask = self._response_mask(batch)  # [2B, T]
        policy = self._pair_logprobs(self.policy, batch)  # [2B] over `mask`, with grad
        reference = self._reference_logprobs(batch, mask)  # [2B]
        lengths = mask.sum(-1).float()  # [2B]
        hp = self.hparams
        out = dpo_loss(
            *policy.chunk(2),
            *reference.chunk(2),
            beta=hp.beta,
            loss_type=hp.loss_type,
            label_smoothing=hp.label_smoothing,
            margin=hp.margin,
            length_chosen=lengths.chunk(2)[0],
            length_rejected=lengths.chunk(2)[1],
        )
        out["implicit_accuracy"] = implicit_accuracy(out["reward_chosen"], out["reward_rejected"])
        out["implicit_margin"] = (out["reward_chosen"] - out["reward_rejected"]).mean()
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for part, out in self.validation_parts(batch):
            n = self.loss_count(part)
            for key in VAL_KEYS:
                self.val[key].update(out[key], weight=n)
            self.val_reward_chosen.update(out["reward_chosen"])
            self.val_reward_rejected.update(out["reward_rejected"])

    def on_validation_epoch_end(self) -> None:
        for key, metric in self.val.items():
            prog_bar = key == "implicit_accuracy"
            self.log(f"val/{key}", metric.compute(), prog_bar=prog_bar, sync_dist=True)
            metric.reset()
        for name, metric in (
            ("val/reward_chosen", self.val_reward_chosen),
            ("val/reward_rejected", self.val_reward_rejected),
        ):
            self.log(name, metric.compute(), sync_dist=True)
            metric.reset()

    def on_fit_start(self) -> None:
        if self.hparams.disable_dropout:
            train_without_dropout(self.policy)
        else:
            self.policy.train()
        self.reference.to(self.device)
        if hasattr(self.reward, "to"):
            self.reward.to(self.device)
        datasets = getattr(getattr(self.trainer, "datamodule", None), "datasets", None)
        if self.hparams.precompute_ref_logprobs and datasets:
            self.precompute_reference(
                [pair for split in ("train", "val") for pair in datasets.get(split, [])]
            )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # validation and the evaluation callbacks switch modes; every step trains without dropout
        if self.hparams.disable_dropout:
            train_without_dropout(self.policy)

    # --- MicroBatchedModule (units, select: `PairUnits`) ---------------------------------------
    def micro_loss(self, part: dict) -> dict[str, torch.Tensor]:
        out = self(part)
        for key in ("logratio_chosen", "logratio_rejected"):
            out[key] = out[key].detach().mean()
        out.pop("per_pair")
        return out

    def trained_parameters(self):
        return [p for p in self.policy.parameters() if p.requires_grad]  # LoRA: the adapter

    # --- helpers ----------------------------------------------------------------------------
    @torch.no_grad()
    def precompute_reference(self, pairs: list[dict]) -> None:
        """Fill the reference table for encoded pairs (`data.preference` items with an `index`).

        Every rank must call it with the same pairs: each scores every W-th of them (its share)
        and the shares are summed over ranks, so every rank ends with the whole table.
        """
        from rlhf_lightning.data.preference import PreferenceCollator

        n = max((pair["index"] for pair in pairs), default=-1) + 1
        table = torch.zeros(n, 2, dtype=torch.float64, device=self.device)
        scored = torch.zeros(n, dtype=torch.float64, device=self.device)
        collate = PreferenceCollator(self.tokenizer.pad_token_id)
        size = self.forward_batch_size or 64
        mine = pairs[rank() :: world_size()]
        for start in range(0, len(mine), size):
            batch = collate(mine[start : start + size])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._step_precision():  # the policy's precision: ρ = 0 at step 0 under bf16 too
                values = self._pair_logprobs(self.reference, batch)
            table[batch["index"]] = values.double().view(2, -1).T  # [B, 2]
            scored[batch["index"]] = 1.0
        table, scored = all_reduce_sum(table), all_reduce_sum(scored)
        table[scored == 0] = float("nan")  # indices that no pair had
        self.reference_table = table.float()

    def _step_precision(self):
        """The context Lightning runs every step's forward in (`trainer.precision=bf16-mixed`:
        bf16 autocast), for reference passes made outside a step; a no-op without a trainer."""
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer else contextlib.nullcontext()

    def _response_mask(self, batch: dict) -> torch.Tensor:
        """Response positions that are part of the response space: with allowed ids (an
        enumerable task) a token outside them (the EOS after a fixed-length response) is not."""
        return self._in_response_space(batch["input_ids"], batch["response_mask"])

    def _in_response_space(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        allowed = self.generation.allowed_token_ids
        if allowed is not None:
            mask = mask * torch.isin(ids, allowed.to(mask.device))
        return mask

    def _sequence_logprobs(self, model, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        """log p(y|u) [N] of each row, at the sampling temperature over the allowed ids."""
        scores = response_logprobs(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            mask,
            self.generation.temperature,
            self.generation.allowed_token_ids,
        )
        return scores.logprobs.sum(-1)

    def _pair_logprobs(self, model, batch: dict) -> torch.Tensor:
        """log p(y|u) [2B] of a pair batch (rows i and B + i a pair), over the positions of
        `_response_mask(batch)`: with `shared_prefix` each pair's prompt runs once
        (`models.logprobs.pair_logprobs`); otherwise, or where it cannot share, the plain pass."""
        return pair_logprobs(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["response_mask"],
            self.generation.temperature,
            self.generation.allowed_token_ids,
            shared_prefix=bool(self.hparams.shared_prefix),
            scored=self._in_response_space,
        )

    def _reference_logprobs(self, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        """log p_ref(y|u) [2B]: from the table by pair index where scored, else computed."""
        table, index = self.reference_table, batch.get("index")
        if table is None or index is None:
            with torch.no_grad():
                if not self.forward_batch_size or len(mask) <= 2 * self.forward_batch_size:
                    return self._pair_logprobs(self.reference, batch)
                return self._chunked_reference(batch, mask, torch.arange(len(mask)))
        table, index = table.to(mask.device), index.to(mask.device)
        known = index < len(table)
        values = torch.full((len(index), 2), float("nan"), device=mask.device)
        values[known] = table[index[known]]
        values = values.T.reshape(-1)  # [2B]: chosen rows, then rejected rows
        missing = values.isnan().nonzero().flatten()
        if len(missing):  # a pair outside the precomputed ones: scored here (not stored)
            with torch.no_grad():
                values[missing] = self._chunked_reference(batch, mask, missing).float()
        return values

    def _chunked_reference(self, batch: dict, mask: torch.Tensor, rows: torch.Tensor):
        def score(chunk: torch.Tensor) -> torch.Tensor:
            sub = {**trimmed(batch, rows[chunk], PAIR_ROWS[:2]), "response_mask": mask[rows[chunk]]}
            sub["response_mask"] = sub["response_mask"][:, : sub["input_ids"].shape[1]]
            return self._sequence_logprobs(self.reference, sub, sub["response_mask"])

        size = 2 * self.forward_batch_size if self.forward_batch_size else None
        return chunked(score, len(rows), size)
