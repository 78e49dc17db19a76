"""Build or load the networks of every stage: a tiny Llama from a config, or any HF checkpoint.

`ModelSpec` is what `conf/model/*.yaml` instantiates. It hands out the tokenizer, a causal LM
(SFT model, policy, reference) and a reward model: `AutoModelForSequenceClassification` with
`num_labels=1`, whose score is read at the last real (non-pad) token. Whatever we save,
transformers and TRL load as it is. With `model.lora` set, the policy stage trains a LoRA adapter
and uses the adapter-free network as its reference (`models/lora.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_lightning.errors import ArtifactError
from rlhf_lightning.models import lora as _lora
from rlhf_lightning.models.tokenizer import PAD, build_tokenizer

TINY_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


@dataclass
class ModelSpec:
    """Where the networks come from.

    name_or_path: None builds the tiny Llama from `config` with a tokenizer trained offline on the
        data; otherwise a Hub name or local directory for `from_pretrained`.
    config: LlamaConfig keyword arguments for the tiny model (merged over `TINY_DEFAULTS`).
    vocab_size: size of the offline byte-level BPE vocabulary (tiny model only).
    trust_remote_code: passed to `from_pretrained`; off unless the user sets it.
    dtype: parameter dtype, e.g. "float32" or "bfloat16".
    lora: None trains every policy weight; a mapping {r, alpha, dropout, target_modules} trains
        a LoRA adapter in the policy stage instead (`LoraSettings`; SFT and RM train fully).
    """

    name_or_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 512
    trust_remote_code: bool = False
    dtype: str = "float32"
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.lora_settings  # noqa: B018 (a bad model.lora, or no peft, fails at start-up)

    @property
    def lora_settings(self) -> _lora.LoraSettings | None:
        """`lora`, validated (None: no LoRA)."""
        return _lora.lora_settings(self.lora)

    @property
    def is_tiny(self) -> bool:
        return self.name_or_path is None

    def tokenizer(
        self, corpus: Callable[[], Iterable[str]], cache_dir: Path
    ) -> PreTrainedTokenizerBase:
        """The tokenizer of the spec's model.

        Tiny model: trained once on `corpus()` and saved to `cache_dir`, so every stage of a task
        shares the same ids. Pretrained: loaded from `name_or_path` (a pad token is added when it
        has none; the embeddings grow to match).
        """
        if not self.is_tiny:  # a pretrained tokenizer belongs to its checkpoint: never cached
            tokenizer = AutoTokenizer.from_pretrained(
                self.name_or_path, trust_remote_code=self.trust_remote_code
            )
            if tokenizer.pad_token is None:
                tokenizer.add_special_tokens({"pad_token": PAD})
            tokenizer.padding_side = "right"
            return tokenizer
        if (cache_dir / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(cache_dir)
        tokenizer = build_tokenizer(corpus(), vocab_size=self.vocab_size)
        _save_atomic(tokenizer, cache_dir)
        return tokenizer

    def causal_lm(self, tokenizer: PreTrainedTokenizerBase, path: str | Path | None = None):
        """A causal LM: from `path` (an artifact) if given, else the spec's initial model."""
        if path is not None:
            return _load(AutoModelForCausalLM, path, self.trust_remote_code, self._dtype)
        if self.is_tiny:
            return AutoModelForCausalLM.from_config(self._tiny_config(tokenizer)).to(self._dtype)
        model = _load(AutoModelForCausalLM, self.name_or_path, self.trust_remote_code, self._dtype)
        return _fit_vocab(model, tokenizer)

    def policy_and_reference(
        self, tokenizer: PreTrainedTokenizerBase, path: str | Path | None = None
    ) -> tuple[Any, Any]:
        """The policy stage's (policy, reference), both from `path` (the SFT artifact).

        Without `lora`: two independent copies. With it: a LoRA `PeftModel` and an
        `AdapterDisabledReference` over the same weights (save with `lora.export_for_saving`).
        """
        return _lora.policy_and_reference(self, tokenizer, path)

    def reward_model(self, tokenizer: PreTrainedTokenizerBase, path: str | Path | None = None):
        """A scalar-head sequence classifier (num_labels=1): from `path`, else freshly headed."""
        if path is not None:
            return _load(
                AutoModelForSequenceClassification, path, self.trust_remote_code, self._dtype
            )
        if self.is_tiny:
            config = self._tiny_config(tokenizer)
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
            return model.to(self._dtype)
        model = AutoModelForSequenceClassification.from_pretrained(
            self.name_or_path,
            num_labels=1,
            trust_remote_code=self.trust_remote_code,
            dtype=self._dtype,
        )
        return _fit_vocab(model, tokenizer)

    @property
    def _dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def _tiny_config(self, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
        kwargs = {**TINY_DEFAULTS, **dict(self.config)}
        return LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )


def _load(auto_cls, path, trust_remote_code: bool, dtype: torch.dtype) -> PreTrainedModel:
    try:
        return auto_cls.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
    except OSError as err:
        raise ArtifactError(
            f"cannot load a model from '{path}': {err}. Check the path, or the Hub name "
            "(offline machines need a local directory)"
        ) from err


def _fit_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Grow the embeddings when the tokenizer gained tokens (e.g. a pad token) and record pad."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _save_atomic(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    from rlhf_lightning.artifacts import atomic_directory

    with atomic_directory(directory) as tmp:
        tokenizer.save_pretrained(tmp)


def hf_config(path: str | Path):
    """The transformers config of a saved model (cheap check that an artifact is a model)."""
    return AutoConfig.from_pretrained(path)
