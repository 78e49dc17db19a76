"""Samples come from our settings only, never from a checkpoint's `generation_config.json`.

A checkpoint's `generation_config.json` may set repetition_penalty, top_k, top_p, min_p,
suppress_tokens, no_repeat_ngram_size, … which would make samples come from another distribution
than the one the log-probs score; from it we take only the stop ids (`encoding.stop_token_ids`).
`generate` in transformers 5 fills every field of the config it is given that is None from
`model.generation_config` (`_prepare_generation_config`), and many fields (min_p, suppress_tokens,
forced_eos_token_id, stop_strings, …) have no neutral non-None value, so `HFGenerateBackend`
passes a complete config of ours (`own_generation_config`) AND blanks the model's for the call
(`checkpoint_defaults_off`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers import GenerationConfig

from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.models.heads import head_model


def own_generation_config(
    settings: GenerationSettings, pad_id: int | None, stops: list[int], sampled: bool
) -> GenerationConfig:
    """Our settings as a complete `GenerationConfig`: every field transformers has a default for
    at its neutral value (the lengths come from `max_new_tokens`/`min_new_tokens`), and, when
    `generate` samples (`sampled`; keyed sampling is greedy over `KeyedGumbelSampling`'s
    perturbed logits), T = `settings.temperature` with top_k off; the stop ids and the pad id.
    Nothing in it comes from the checkpoint's `generation_config.json`."""
    neutral = GenerationConfig._get_default_generation_params()
    for key in ("max_length", "min_length"):  # `max_new_tokens`/`min_new_tokens` say it
        neutral.pop(key)
    config = GenerationConfig(**neutral)
    sampling = dict(temperature=settings.temperature, top_k=0) if sampled else {}  # HF: top_k 50
    config.update(
        do_sample=sampled,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        eos_token_id=list(stops),
        pad_token_id=pad_id,
        **sampling,
    )
    return config


@contextlib.contextmanager
def checkpoint_defaults_off(policy) -> Iterator[None]:
    """The model `generate` runs on holds a blank `generation_config` while the block runs, so
    `generate` has nothing of the checkpoint's to fill our config's None fields with (restored
    after). Models we only call whole (`head_model` gives None) keep theirs."""
    hf, _ = head_model(policy)
    saved = getattr(hf, "generation_config", None)
    if saved is None:
        yield
        return
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved
