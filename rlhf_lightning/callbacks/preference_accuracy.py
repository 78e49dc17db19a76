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
from rlhf_lightning.models.logprobs import forward_logprobs


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """mean(1[c > r] + ½·1[c = r]) over pairs.  [B], [B] -> float."""
    return float(((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean())


def response_logprobs(
    model,
    tokenizer,
    prompts: list[str],
    responses: list[str],
    generation: GenerationSettings,
    max_length: int = 256,
    batch_size: int = 64,
) -> torch.Tensor:
    """log p(y|u) = Σ_t log p(y_t | u, y_<t) of each (prompt, response), [B] float32 on CPU.

    Encoded as every stage does (`[bos] + prompt`, `response [+ eos]`); EOS is appended only when
    the policy can sample it (not for fixed-length or allowed-token responses that exclude it).
    """
    eos_id = tokenizer.eos_token_id
    allowed = generation.allowed_token_ids
    can_end = generation.min_new_tokens < generation.max_new_tokens and (
        allowed is None or bool((allowed == eos_id).any())
    )
    rows, masks = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p, r = truncate(
            encode_prompt(tokenizer, prompt),
            encode_response(tokenizer, response, eos=can_end),
            max_length,
            eos_id,
        )
        rows.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        ids, attention = pad(rows[start : start + batch_size], tokenizer.pad_token_id)  # [b, T]
        response_mask, _ = pad(masks[start : start + batch_size], 0)  # [b, T]
        logprobs, _, _ = forward_logprobs(
            model,
            ids.to(device),
            attention.to(device),
            response_mask.to(device),
            generation.temperature,
            generation.allowed_token_ids,
        )
        out.append(logprobs.sum(-1).float().cpu())  # [b]
    return torch.cat(out)


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
        score = self._scorer(module, prompts)
        if self._reference_logprobs is None:  # the reference is frozen: score it once
            with evaluation_mode(module.reference, seed=0):
                self._reference_logprobs = (
                    score(module.reference, chosen),
                    score(module.reference, rejected),
                )
        ref_chosen, ref_rejected = self._reference_logprobs
        with evaluation_mode(module.policy, seed=0):
            policy_chosen, policy_rejected = (
                score(module.policy, chosen),
                score(module.policy, rejected),
            )
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
                self._rm_accuracy = pairwise_accuracy(raw(prompts, chosen), raw(prompts, rejected))
        return self._rm_accuracy

    def _scorer(self, module, prompts: list[str]):
        def score(model, responses: list[str]) -> torch.Tensor:
            return response_logprobs(
                model,
                module.tokenizer,
                prompts,
                responses,
                module.generation,
                self.max_length,
                self.batch_size,
            )

        return score
