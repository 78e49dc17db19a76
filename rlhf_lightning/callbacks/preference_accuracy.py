"""`PreferenceAccuracyCallback`: held-out preference accuracy of the frozen RM and of the policy.

On the first `n_pairs` validation pairs (u, y⁺, y⁻) of the data (`data.load("prefs", "val")`):

    eval/rm_accuracy        = mean 1[r_φ(u,y⁺) > r_φ(u,y⁻)]         (the frozen reward model; once)
    eval/implicit_accuracy  = mean 1[r̂(u,y⁺) > r̂(u,y⁻)],  r̂(u,y) = β (log p_θ(y|u) − log p_ref(y|u))
    eval/implicit_margin    = mean (r̂(u,y⁺) − r̂(u,y⁻))

r̂ is the reward the policy implicitly optimises (Rafailov et al. 2023, DPO,
https://arxiv.org/abs/2305.18290): at the optimum p* ∝ p_ref exp(r/β) it equals r up to a
per-prompt constant, so its accuracy tends to the RM's as the policy approaches p*. Ties count ½
(before the first update p_θ = p_ref and every r̂ is 0: accuracy ½). Sequences are scored at the
sampling temperature over the allowed tokens, exactly as the policy samples them.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.callbacks.common import EvalCallback, evaluation_mode, log_metrics
from rlhf_lightning.data.batching import pad, truncate
from rlhf_lightning.data.encoding import encode_prompt, encode_response
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.models.logprobs import pair_logprobs as pair_sums


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """mean(1[c > r] + ½·1[c = r]) over pairs.  [B], [B] -> float."""
    return float(((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean())


def _encoded(tokenizer, prompt: str, response: str, generation, max_length: int):
    """(prompt ids, response ids) as every stage encodes them (`[bos] + prompt`, `response
    [+ eos]`), cut to `max_length`; EOS is appended only when the policy can sample it (not for
    fixed-length or allowed-token responses that exclude it)."""
    eos_id = tokenizer.eos_token_id
    allowed = generation.allowed_token_ids
    can_end = generation.min_new_tokens < generation.max_new_tokens and (
        allowed is None or bool((allowed == eos_id).any())
    )
    return truncate(
        encode_prompt(tokenizer, prompt),
        encode_response(tokenizer, response, eos=can_end),
        max_length,
        eos_id,
    )


def pair_logprobs(
    model,
    tokenizer,
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    generation: GenerationSettings,
    max_length: int = 256,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y⁺|u), log p(y⁻|u) [B] float32 on CPU, each pair's prompt run once for both sides
    (`models.logprobs.pair_logprobs`, as DPO scores a pair); a batch whose pairs were cut
    differently, or a model that cannot share, takes the plain pass: the same sums to round-off.
    batch_size: sequences per forward pass (two per pair)."""
    device = next(model.parameters()).device
    pairs = max(1, batch_size // 2)
    out_chosen, out_rejected = [], []
    for start in range(0, len(prompts), pairs):
        stop = start + pairs
        rows = [
            _encoded(tokenizer, u, y, generation, max_length)
            for side in (chosen, rejected)
            for u, y in zip(prompts[start:stop], side[start:stop], strict=True)
        ]  # [2b]: chosen rows, then rejected rows
        ids, attention, response_mask = (t.to(device) for t in _right_padded(rows, tokenizer))
        values = pair_sums(
            model,
            ids,
            attention,
            response_mask,
            generation.temperature,
            generation.allowed_token_ids,
        )
        values = values.float().cpu()
        out_chosen.append(values[: len(rows) // 2])
        out_rejected.append(values[len(rows) // 2 :])
    return torch.cat(out_chosen), torch.cat(out_rejected)


def _right_padded(encoded: list[tuple[list[int], list[int]]], tokenizer):
    """ids, attention mask and response mask [b, T] of (prompt, response) id lists."""
    ids, attention = pad([p + r for p, r in encoded], tokenizer.pad_token_id)
    response_mask, _ = pad([[0] * len(p) + [1] * len(r) for p, r in encoded], 0)
    return ids, attention, response_mask


class PreferenceAccuracyCallback(EvalCallback):
    """n_pairs: validation pairs used; max_length: token limit of prompt + response;
    batch_size: sequences per forward pass."""

    def __init__(
        self,
        every_n_steps: int = 10,
        n_pairs: int = 256,
        max_length: int = 256,
        batch_size: int = 128,
        at_start: bool = True,
        at_end: bool = True,
    ):
        super().__init__(every_n_steps, at_start, at_end)
        self.n_pairs, self.max_length, self.batch_size = n_pairs, max_length, batch_size
        self._pairs: tuple[list[str], list[str], list[str]] | None = None
        self._rm_accuracy: float | None = None
        self._rm_checked = False
        self._reference_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        prompts, chosen, rejected = self.pairs(trainer)
        scalars = {}
        rm_accuracy = self.rm_accuracy(module, prompts, chosen, rejected)
        if rm_accuracy is not None:
            scalars["eval/rm_accuracy"] = rm_accuracy
        if self._reference_logprobs is None:  # the reference is frozen: score it once
            with evaluation_mode(module.reference, seed=0):
                self._reference_logprobs = self._score(module, module.reference)
        ref_chosen, ref_rejected = self._reference_logprobs
        with evaluation_mode(module.policy, seed=0):
            policy_chosen, policy_rejected = self._score(module, module.policy)
        beta = float(module.beta.value)
        implicit_chosen = beta * (policy_chosen - ref_chosen)  # [B]
        implicit_rejected = beta * (policy_rejected - ref_rejected)  # [B]
        scalars["eval/implicit_accuracy"] = pairwise_accuracy(implicit_chosen, implicit_rejected)
        scalars["eval/implicit_margin"] = float((implicit_chosen - implicit_rejected).mean())
        log_metrics(trainer, scalars, trainer.global_step)

    def pairs(self, trainer: L.Trainer) -> tuple[list[str], list[str], list[str]]:
        """Prompts, chosen and rejected responses of the first `n_pairs` validation pairs."""
        if self._pairs is None:
            data = getattr(trainer.datamodule, "data", None)
            if data is None:
                raise ConfigError(
                    "PreferenceAccuracyCallback needs the run's data (trainer.datamodule.data) for "
                    "its held-out preference pairs; run with callbacks=none otherwise"
                )
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)  # the run's chat template
            records = data.load("prefs", "val", tokenizer).records[: self.n_pairs]
            self._pairs = (
                [r.prompt for r in records],
                [r.chosen for r in records],
                [r.rejected for r in records],
            )
        return self._pairs

    def rm_accuracy(self, module, prompts, chosen, rejected) -> float | None:
        """Accuracy of the frozen reward model (raw scores), computed once; None without `raw`."""
        if not self._rm_checked:
            self._rm_checked = True
            raw = getattr(module.reward, "raw", None)
            if raw is None:
                rank_zero_info(
                    f"PreferenceAccuracyCallback: the reward "
                    f"{type(module.reward).__name__} is not a reward model "
                    "(no `raw`): eval/rm_accuracy is not logged"
                )
            else:
                # a pair's prompt twice in a row: it runs once for both sides (group_size 2)
                both = [y for pair in zip(chosen, rejected, strict=True) for y in pair]
                scores = raw([u for u in prompts for _ in range(2)], both, group_size=2)
                self._rm_accuracy = pairwise_accuracy(scores[0::2], scores[1::2])
        return self._rm_accuracy

    def _score(self, module, model) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(y⁺|u), log p(y⁻|u) [n_pairs] under `model` (`pair_logprobs`)."""
        prompts, chosen, rejected = self._pairs
        return pair_logprobs(
            model,
            module.tokenizer,
            prompts,
            chosen,
            rejected,
            module.generation,
            self.max_length,
            self.batch_size,
        )
