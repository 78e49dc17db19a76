"""`PolicyModule`: optimise p_θ on E[r(u,y)] − β·KL(p_θ‖p_ref), with manual optimisation.

Per step: prompts → sample k responses each (policy in eval mode, KV cache) → log p_old, log p_ref
(once per rollout, no grad) → rewards from the frozen reward function (text in, scores out) →
per-token KL → advantages by the algorithm → `epochs` passes over `minibatches` with the clipped
surrogate → β controller update with the measured KL.

The reference and reward model are frozen, in eval mode, outside the optimiser and outside the
module's state dict (checkpoints hold the policy, value head, optimiser and β state only).

Size (over ~300 lines): the rollout, the PPO-style update and the exact step of one manually
optimised module; its optimiser steps (`_optimise`, `_step`) leave with the one optimiser step
every stage is to share (issue 24).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import lightning as L
import torch
from torch import nn

from rlhf_lightning.control.beta import BetaController
from rlhf_lightning.distributed import (
    all_reduce_sum,
    global_mean_scale,
    world_size,
)
from rlhf_lightning.errors import NumericalError
from rlhf_lightning.fsdp2 import shard_trained
from rlhf_lightning.generation.keyed import sample_seeds
from rlhf_lightning.generation.sampling import decode_responses, policy_prompts, sample
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.losses import masked_mean, ppo_policy_loss, ppo_value_loss, sequence_kl
from rlhf_lightning.microbatch import (
    accumulate,
    chunked,
    optimiser_step,
    plan,
    shape_on_failure,
    trim_columns,
)
from rlhf_lightning.models.factory import train_without_dropout
from rlhf_lightning.models.logprobs import forward_logprobs
from rlhf_lightning.modules.algorithm import Algorithm
from rlhf_lightning.modules.rollout import Rollout, minibatch_rows
from rlhf_lightning.rewards.base import score
from rlhf_lightning.sharding import gathered_weights

NUMERICAL_FIX = "lower the learning rate, or raise beta"  # what a non-finite loss asks for


class PolicyModule(L.LightningModule):
    """policy: HF causal LM (trained). reference: frozen copy of the SFT model. reward: a
    `RewardFunction`. exact: for `algo=exact`, an `OracleEvaluator` giving the enumerated J(θ).

    micro_batch_size / max_tokens_per_micro_batch: sequences (or a token budget) per training
    forward/backward inside each minibatch (`microbatch.py`; None: the whole minibatch).
    forward_batch_size: sequences per no-grad pass (generation, log p_old, log p_ref, values, the
    reward) and per evaluation call (None: the whole rollout). Neither changes the result.
    shared_prefix: run each prompt once per group of k samples in every pass over whole groups
    (log p_old, log p_ref, values, and the update when its minibatch keeps the groups; see
    `models/logprobs.py`); same numbers, less work on long prompts.
    """

    stage_name = "policy"

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module,
        reward: Callable,
        tokenizer,
        algorithm: Algorithm,
        beta_controller: BetaController,
        optimizer: Callable,
        generation: GenerationSettings,
        kl_estimator: str = "k1",
        kl_penalty: str = "token",
        missing_eos_penalty: float | None = None,
        max_grad_norm: float | None = 1.0,
        exact=None,
        seed: int = 0,
        micro_batch_size: int | None = None,
        forward_batch_size: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
        shared_prefix: bool = True,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.value_head = (
            nn.Linear(policy.config.hidden_size, 1) if algorithm.uses_value_head else None
        )
        self._frozen = {"reference": reference.eval().requires_grad_(False), "reward": reward}
        self.tokenizer, self.algorithm, self.beta = tokenizer, algorithm, beta_controller
        self.optimizer_factory, self.generation = optimizer, generation
        self.kl_estimator, self.kl_penalty = kl_estimator, kl_penalty
        self.missing_eos_penalty, self.max_grad_norm = missing_eos_penalty, max_grad_norm
        self.exact, self.seed = exact, seed
        self.micro_batch_size, self.forward_batch_size = micro_batch_size, forward_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.shared_prefix = shared_prefix

    @property
    def reference(self) -> nn.Module:
        return self._frozen["reference"]

    @property
    def reward(self) -> Callable:
        return self._frozen["reward"]

    def configure_model(self) -> None:
        # trainer=fsdp: FSDP2 units over the policy and the value head (no-op elsewhere)
        shard_trained(self)

    def on_fit_start(self) -> None:
        # Dropout stays off in RL (as in TRL): log p at sampling time must equal log p at update
        # time, or the PPO ratio and the KL are biased by dropout noise. (Lightning warns about
        # modules in eval mode at the start of training; here that is intended.)
        self.policy.eval()
        self.reference.to(self.device)
        if hasattr(self.reward, "to"):
            self.reward.to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One rollout and its updates. `batch`: {"prompts": [P] text, "index": [P] sampling keys}
        (a plain list of prompts samples from the global RNG instead)."""
        prompts, keys = (
            (batch["prompts"], batch["index"]) if isinstance(batch, dict) else (batch, None)
        )
        if self.algorithm.name == "exact":
            stats = self._exact_step()
        else:
            fused = self.fuses_old_logprobs  # the update's forward gives log p_old
            with gathered_weights(self.trainer):  # FSDP: gathered once per rollout, not per token
                rollout = self.rollout(prompts, keys, old_logprobs=not fused)
            stats = self._fused_update(rollout) if fused else self._update(rollout)
        self._check_finite(stats)
        stats["train/beta"] = torch.tensor(self.beta.value)
        # the β controller sees the global batch: the same β on every rank, and as on one process
        k, strategy = self.algorithm.group_size, self.trainer.strategy
        n = strategy.reduce(torch.tensor(float(len(prompts) * k), device=self.device), None, "sum")
        kl = strategy.reduce(stats["train/kl"].detach() * len(prompts) * k, None, "sum") / n
        # n_steps counts samples (what AdaptiveBeta's horizon counts, as in Ziegler et al. and TRL)
        self.beta.update(float(kl), n_steps=int(n))
        reward = stats.pop("train/reward")
        self.log_dict(stats, batch_size=len(prompts), sync_dist=True)
        self.log("train/reward", reward, prog_bar=True, batch_size=len(prompts), sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]  # LoRA: the adapter
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        return self.optimizer_factory(params)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["beta_controller"] = self.beta.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "beta_controller" in checkpoint:
            self.beta.load_state_dict(checkpoint["beta_controller"])

    @property
    def fuses_old_logprobs(self) -> bool:
        """One update per rollout and no value head: the update's own forward pass gives log p_old
        (the ratio is exactly 1 there), so the rollout skips its separate no-grad forward."""
        algo, whole = self.algorithm, self.micro_batch_size is None
        one_pass = whole and self.max_tokens_per_micro_batch is None
        return algo.epochs == 1 and algo.minibatches == 1 and self.value_head is None and one_pass

    @torch.no_grad()
    def rollout(
        self, prompts: list[str], keys: torch.Tensor | None = None, old_logprobs: bool = True
    ) -> Rollout:
        """Sample `group_size` responses per prompt and score them (everything detached).

        `keys` [P] (the prompts' indices in the prompt set) give each sample its own random stream,
        seeded by (seed, rollout number, key, j): a sample is the same whichever rank draws it.
        `old_logprobs=False` leaves `logprobs` and `entropy` to the update (`_fused_update`).
        """
        k, gen, size = self.algorithm.group_size, self.generation, self.forward_batch_size
        prompts = policy_prompts(self.tokenizer, prompts, gen)  # cut at gen.max_prompt_length
        if size is not None and self.shared_prefix:  # chunks of whole groups
            size = max(k, size - size % k)
        seeds = None
        if keys is not None:
            seeds = sample_seeds(self.seed, self._rollouts_done(), keys, k)
        n = len(prompts) * k if size is None else min(size, len(prompts) * k)
        with shape_on_failure(self, f"{n} sequences × prompt + {gen.max_new_tokens} new tokens"):
            ids, attn, resp_mask, ended, width = sample(
                *(self.policy, self.tokenizer, prompts, k, gen, seeds),
                batch_size=size,
                shared_prefix=self.shared_prefix,
            )
        rows = len(ids)
        shared = (k, width) if self.shared_prefix else None  # rows come in groups of k

        def policy_pass(r):  # log p_old, its entropy and V(s) of rows r
            out = forward_logprobs(
                self.policy,
                *(ids[r], attn[r], resp_mask[r]),
                gen.temperature,
                gen.allowed_token_ids,
                entropy=True,
                hidden=self.value_head is not None,
                shared_prefix=shared,
            )
            values = self._values(out.hidden) if out.hidden is not None else None
            return out.logprobs, out.entropy, values

        def reference_pass(r):
            return forward_logprobs(
                self.reference,
                ids[r],
                attn[r],
                resp_mask[r],
                gen.temperature,
                gen.allowed_token_ids,
                shared_prefix=shared,
            ).logprobs

        with shape_on_failure(self, {"input_ids": ids[:size]}):
            logprobs = entropy = values = None
            if old_logprobs:
                logprobs, entropy, values = chunked(policy_pass, rows, size)
            ref_logprobs = chunked(reference_pass, rows, size)
            prompts_k = [p for p in prompts for _ in range(k)]
            responses = decode_responses(self.tokenizer, ids, resp_mask)
            group = k if size is None or size % k == 0 else 1  # chunks of whole groups of k
            scores = chunked(  # a response cut at max_new_tokens is scored without EOS
                lambda r: score(
                    self.reward,
                    [prompts_k[i] for i in r.tolist()],
                    [responses[i] for i in r.tolist()],
                    ended[r].tolist(),
                    group_size=group,
                ).float(),
                rows,
                size,
            ).to(self.device)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~ended).float()
        return Rollout(
            prompts=prompts_k,
            responses=responses,
            input_ids=ids,
            attention_mask=attn,
            response_mask=resp_mask.float(),
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            scores=scores,
            ended=ended,
            entropy=entropy,
            values=values,
            prompt_width=width,
            group_size=k,
        )

    def advantages(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Advantages [B, T] of a rollout at the current β, and returns [B, T] (PPO) or None."""
        kl = self.algorithm.kl_tokens(rollout, self.kl_estimator)  # [B, T]
        all_reduce = all_reduce_sum if world_size() > 1 else None
        return self.algorithm.advantages(rollout, kl, self.beta.value, self.kl_penalty, all_reduce)

    def minibatch_loss(
        self,
        mb: Rollout,
        advantages: torch.Tensor,
        returns: torch.Tensor | None,
        logprobs: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Differentiable loss of one rollout minibatch (no optimiser step).

        loss = clipped surrogate (+ vf_coef · clipped value loss with a value head). Returns
        {"loss", "policy_loss", "clipfrac", "approx_kl"} (+ "value_loss"); at ratio 1 (the first
        minibatch of the first epoch) the surrogate's gradient is the plain policy gradient.
        """
        hidden = None
        if logprobs is None:  # else: this minibatch's log p_θ, with grad, from the caller
            logprobs, _, hidden = forward_logprobs(
                self.policy,
                mb.input_ids,
                mb.attention_mask,
                mb.response_mask,
                self.generation.temperature,
                self.generation.allowed_token_ids,
                hidden=self.value_head is not None,
                shared_prefix=self._shared(mb),
            )
        policy_loss, clipfrac, approx_kl = ppo_policy_loss(
            logprobs, mb.logprobs, advantages, mb.response_mask, self.algorithm.clip_range
        )
        out = {
            "loss": policy_loss,
            "policy_loss": policy_loss,
            "clipfrac": clipfrac,
            "approx_kl": approx_kl,
        }
        if self.value_head is not None:
            value_loss, _ = ppo_value_loss(
                self._values(hidden),
                mb.values,
                returns,
                mb.response_mask,
                self.algorithm.clip_range_value,
            )
            out["loss"] = policy_loss + self.algorithm.vf_coef * value_loss
            out["value_loss"] = value_loss
        return out

    def _update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """`epochs` passes over `minibatches` of the rollout, one optimiser step per minibatch,
        each minibatch through the network in micro-batches (`microbatch.accumulate`)."""
        advantages, returns = self.advantages(rollout)
        stats = self._rollout_stats(rollout)
        optimizer = self.optimizers()
        history: dict[str, list[torch.Tensor]] = {}
        mask, rollout_number = rollout.response_mask, self._rollouts_done()
        train_without_dropout(self.policy)
        for epoch in range(self.algorithm.epochs):
            stream = (self.seed, rollout_number, epoch)  # keys this epoch's shuffle
            rows = minibatch_rows(
                len(rollout.prompts), self.algorithm.minibatches, stream, mask.device
            )
            for idx in rows:  # a rank with no row of a minibatch joins with zero gradients
                parts = self._micro_batches(rollout, advantages, returns, idx)
                group = torch.arange(rollout.group_size, device=mask.device)  # always this rank's
                spare = parts[:1] or self._micro_batches(rollout, advantages, returns, group)
                out = self._optimise(
                    optimizer,
                    parts,
                    lambda part: self.minibatch_loss(*part),
                    lambda part: part[0].response_mask.sum(),
                    spare=spare[0] if spare else None,
                )
                for name in self._diagnostics:
                    history.setdefault(f"ppo/{name}", []).append(out.get(name, mask.new_zeros(())))
        stats.update({k: torch.stack(v).mean() for k, v in history.items()})
        return stats

    def _micro_batches(self, rollout, advantages, returns, idx) -> list[tuple]:
        """(rollout rows, advantages, returns) of each micro-batch of minibatch rows `idx`,
        with the columns that are padding in every row of it trimmed off. When `idx` keeps the
        rollout's groups whole and in order (one minibatch) and prefixes are shared, micro-batches
        are whole groups (the unit of `plan` is then a group of k rows)."""
        k = rollout.group_size
        grouped = self.shared_prefix and k > 1 and torch.equal(idx.cpu(), torch.arange(len(idx)))
        unit = k if grouped else 1
        lengths = rollout.attention_mask[idx].sum(-1).view(-1, unit).max(-1).values.tolist()
        size = self.micro_batch_size
        size = None if size is None else max(1, size // unit)
        budget = self.max_tokens_per_micro_batch
        budget = None if budget is None else max(1, budget // unit)
        parts = []
        for units in plan(len(lengths), size, lengths, budget):
            local = (units[:, None] * unit + torch.arange(unit)).flatten().to(idx.device)
            rows = idx[local]
            sub = rollout.select(rows, group_size=unit)
            cols = trim_columns(sub.attention_mask)
            ret = None if returns is None else returns[rows][:, cols]
            parts.append((sub.columns(cols), advantages[rows][:, cols], ret))
        return parts

    def _shared(self, mb: Rollout) -> tuple[int, int] | None:
        """(k, Tp) when the rows of `mb` are whole groups sharing their prompt columns."""
        if not self.shared_prefix or mb.group_size < 2:
            return None
        return mb.group_size, mb.prompt_width

    def _optimise(self, optimizer, parts, loss_of, count_of, spare=None) -> dict:
        """One optimiser step on the global-mean loss over micro-batches `parts` (`spare`: what a
        rank without rows runs × 0 under FSDP2, see `microbatch.accumulate`)."""
        backward = partial(
            accumulate, *(self, parts, loss_of, count_of), fix=NUMERICAL_FIX, spare=spare
        )
        return optimiser_step(self, optimizer, backward, self.max_grad_norm)

    def _rollouts_done(self) -> int:
        """Rollouts finished before this one (Lightning's global_step counts optimiser steps)."""
        return self.global_step // self.algorithm.updates_per_rollout

    @property
    def _diagnostics(self) -> tuple[str, ...]:
        """The per-minibatch diagnostics `minibatch_loss` returns (logged as ppo/*)."""
        return ("clipfrac", "approx_kl") + (("value_loss",) if self.value_head is not None else ())

    def _fused_update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """One update whose forward pass also gives log p_old = log p_θ (detached) and the entropy.

        The same numbers as a separate no-grad forward followed by the update (same weights, same
        inputs, eval mode), one forward pass fewer per rollout.
        """
        gen, mask = self.generation, rollout.response_mask
        train_without_dropout(self.policy)
        with shape_on_failure(self, {"input_ids": rollout.input_ids}):
            logprobs, entropy, _ = forward_logprobs(
                self.policy,
                rollout.input_ids,
                rollout.attention_mask,
                mask,
                gen.temperature,
                gen.allowed_token_ids,
                entropy=True,
                shared_prefix=self._shared(rollout),
            )
        rollout.logprobs, rollout.entropy = logprobs.detach(), entropy
        advantages, returns = self.advantages(rollout)
        stats = self._rollout_stats(rollout)
        out = self.minibatch_loss(rollout, advantages, returns, logprobs=logprobs)
        scale = global_mean_scale(mask.sum())
        self._step(self.optimizers(), out["loss"] * scale)
        stats.update({f"ppo/{k}": out[k].detach() * scale for k in self._diagnostics})
        return stats

    def _rollout_stats(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """What the rollout says before the update: reward, k1 KL, objective, entropy, length."""
        beta, mask = self.beta.value, rollout.response_mask
        seq_kl = sequence_kl(rollout.logprobs - rollout.ref_logprobs, mask)  # k1 per sequence [B]
        return {
            "train/reward": rollout.scores.mean(),
            "train/kl": seq_kl.mean(),
            "train/objective": (rollout.scores - beta * seq_kl).mean(),
            # nats per token, over the global batch once the logger averages ranks (sync_dist)
            "train/entropy": masked_mean(rollout.entropy, mask) * global_mean_scale(mask.sum()),
            "train/response_length": mask.sum(-1).mean(),
            "train/eos_rate": rollout.ended.float().mean(),
        }

    def _exact_step(self) -> dict[str, torch.Tensor]:
        """Gradient ascent on the enumerated J(θ) (oracle tasks): the reference optimiser."""
        table = self.exact.policy_logprobs(self.policy, self.generation.temperature)  # [P, N]
        terms = self.exact.terms(table, self.beta.value)
        self._step(self.optimizers(), -terms["objective"])
        return {f"train/{k}": v.detach() for k, v in terms.items()}

    def _step(self, optimizer, loss: torch.Tensor) -> None:
        """One optimiser step on a loss computed whole (the fused update, `algo=exact`)."""
        if not torch.isfinite(loss):
            raise NumericalError(
                f"loss is {loss.item()} at step {self.global_step}; the last good checkpoint is "
                f"kept ({NUMERICAL_FIX})"
            )
        optimiser_step(self, optimizer, lambda: self.manual_backward(loss), self.max_grad_norm)

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s_t) aligned with log-probs: position t's value is read from hidden state t−1."""
        v = self.value_head(hidden.float()).squeeze(-1)  # [B, T]
        return torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)

    def _check_finite(self, stats: dict[str, torch.Tensor]) -> None:
        for key in ("train/reward", "train/kl", "train/objective"):
            if key in stats and not torch.isfinite(stats[key]).all():
                raise NumericalError(
                    f"{key} is {stats[key].item()} at step {self.global_step}; the last good "
                    "checkpoint is kept (check the reward model, lower the learning rate)"
                )
