"""`DecodeLoopBackend`: a plain KV-cached decode loop, the same keyed samples as `generate`.

What it removes from `generate`'s time (measured on SmolLM2-135M, `benchmarks/generation.py`):
- keyed noise over the whole vocabulary: `gumbel_perturbed` hashes all V tokens of every row at
  every step, though a token can only win where s_v/T ≥ max_w s_w/T − (g_max − g_min). The keyed
  uniforms are 23-bit, so g = −log(−log u) ∈ [−2.82, 16.64]: only tokens within `MARGIN` of the
  row's best scaled logit get noise, and the argmax over them is the argmax over all V (exact:
  the noise of a token depends on (seed, step, token) only, not on the tokens around it).
- finished rows: a row that has emitted a stop id leaves the batch (its cache rows are dropped),
  where `generate` keeps decoding it into padding until the last row ends.
- per-step machinery: logits processors, stopping criteria, kwargs plumbing.
The forward is the model's own (`hf(..., cache=…, logits_to_keep=1)`, a dynamic cache, positions
counted over real tokens as `generate` counts them), so the logits are `generate`'s.
Unkeyed sampling (`seeds=None`) draws from softmax(s/T) with the global RNG: the same distribution
as `generate`, not the same draws.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.generation.backend import Responses
from rlhf_lightning.generation.keyed import keyed_uniform_at
from rlhf_lightning.generation.prefill import prefill_once
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.models.heads import head_model, position_ids
from rlhf_lightning.models.shared_prefix import cache_kwarg, cache_of

# g ∈ [−log(−log 2⁻²⁴), −log(−log(1 − 2⁻²⁴))] ≈ [−2.82, 16.64]; a token more than their spread
# (19.46) below the row's best s/T can never win the Gumbel argmax. 24 leaves room for round-off.
MARGIN = 24.0
LANE = 64  # noise computed on a multiple of this many values (all on the vectorised path)


class DecodeLoopBackend:
    """Prefill (once per group with `group_size` k > 1, as `HFGenerateBackend`), then one token per
    step for the rows still running; keyed noise only for the tokens that can win."""

    @torch.no_grad()
    def generate(
        self,
        model,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        settings: GenerationSettings,
        seeds: list[int] | None,
        stop_ids: list[int],
        pad_id: int,
        group_size: int = 1,
    ) -> Responses:
        hf, context = head_model(model)
        if hf is None:
            raise ConfigError(
                f"policy.generation.backend: DecodeLoopBackend needs a transformers model, got "
                f"{type(model).__name__}; use rlhf_lightning.generation.hf.HFGenerateBackend"
            )
        rows, device = len(prompt_ids), prompt_ids.device
        out = torch.full((rows, settings.max_new_tokens), pad_id, dtype=torch.long, device=device)
        key = None if seeds is None else torch.tensor(seeds, dtype=torch.int64, device=device)
        stops = torch.tensor(stop_ids, device=device)
        with context:
            cache = prefill_once(model, prompt_ids, prompt_mask, group_size)
            step = _Stepper(hf, prompt_mask, cache)
            logits = step(prompt_ids[:, -1:] if cache else prompt_ids)  # [B, V] float32
            live = torch.arange(rows, device=device)  # rows still running, [b]
            length = 0
            for t in range(settings.max_new_tokens):
                scores = _processed(logits, settings, stops, t)
                token = choose_tokens(scores, key, t, settings.temperature)  # [b]
                out[live, t] = token
                length = t + 1
                running = ~torch.isin(token, stops)
                if t + 1 == settings.max_new_tokens or not bool(running.any()):
                    break
                if not bool(running.all()):  # finished rows leave the batch
                    keep = running.nonzero().squeeze(1)
                    live, token = live[keep], token[keep]
                    key = None if key is None else key[keep]
                    step.select(keep)
                logits = step(token[:, None])
        response = out[:, :length]
        return Responses(response, torch.isin(response, stops).any(-1))


class _Stepper:
    """The model's forward, one call per step, over a dynamic cache whose rows can be dropped."""

    def __init__(self, hf, prompt_mask: Tensor, cache: dict):
        self.hf, self.mask = hf, prompt_mask
        self.kwarg = cache_kwarg(hf)
        self.cache = next(iter(cache.values())) if cache else None
        self.positions = position_ids(prompt_mask)  # [b, Tp]

    def __call__(self, ids: Tensor) -> Tensor:
        """Logits [b, V] float32 at the last of `ids` [b, n] (the last n columns of the mask)."""
        positions = self.positions[:, -ids.shape[1] :]
        out = self.hf(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **({self.kwarg: self.cache} if self.cache is not None else {}),
        )
        self.cache = cache_of(out)
        # the next token: one more real position per row
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return out.logits[:, -1].float()

    def select(self, keep: Tensor) -> None:
        """Keep rows `keep` [b'] of the cache, mask and positions."""
        self.cache.batch_select_indices(keep)
        self.mask, self.positions = self.mask[keep], self.positions[keep]


def _processed(logits: Tensor, settings: GenerationSettings, stops: Tensor, t: int) -> Tensor:
    """`generate`'s processors in its order: no stop before `min_new_tokens`, the allowed ids."""
    scores = logits
    if t < settings.min_new_tokens:
        scores = scores.index_fill(1, stops, float("-inf"))
    if settings.allowed_token_ids is not None:
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        keep[settings.allowed_token_ids.to(scores.device)] = True
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def choose_tokens(scores: Tensor, seeds: Tensor | None, step: int, temperature: float) -> Tensor:
    """Each row's token [b]: the keyed Gumbel-max draw (`keyed.gumbel_perturbed`'s argmax, noise
    only where it can win), or a multinomial draw from softmax(s/T) without seeds."""
    scaled = scores / temperature  # [b, V] (scores are float32)
    if seeds is None:
        return torch.multinomial(torch.softmax(scaled, -1), 1).squeeze(1)
    best = scaled.max(-1, keepdim=True).values  # [b, 1]
    rows, cols = (scaled >= best - MARGIN).nonzero(as_tuple=True)  # [N] candidates, row-major
    pad = (-len(rows)) % LANE  # the same vectorised path for every value (no scalar tail)
    rows_p = torch.cat([rows, rows[:1].expand(pad)])
    cols_p = torch.cat([cols, cols[:1].expand(pad)])
    u = keyed_uniform_at(seeds[rows_p], step, cols_p)[: len(rows)]  # [N]
    perturbed = torch.full_like(scaled, float("-inf"))
    perturbed[rows, cols] = scaled[rows, cols] + -torch.log(-torch.log(u))
    return perturbed.argmax(-1)
