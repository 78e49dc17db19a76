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

from rlhf_lightning import choices
from rlhf_lightning.errors import ArtifactError, CheckpointError, ConfigError
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
# model.dtype: the parameter dtypes a model may be loaded in
DTYPES = {name: getattr(torch, name) for name in choices.DTYPES}  # config.validate checks names
WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
    gradient_checkpointing: recompute each layer's activations in the backward pass instead of
        keeping them (every trained network: SFT, RM, policy, LoRA policy; same gradients).
    """

    name_or_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 512
    trust_remote_code: bool = False
    dtype: str = "float32"
    lora: dict[str, Any] | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.lora_settings  # noqa: B018 (a bad model.lora, or no peft, fails at start-up)
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"model.dtype={self.dtype!r} is invalid: expected one of {list(DTYPES)}"
            )

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
        shares the same ids. Pretrained: loaded from `name_or_path` after the checkpoint is
        checked (`checkpoint_tokenizer`); its pad token is made distinct from EOS (`distinct_pad`).
        """
        if not self.is_tiny:  # a pretrained tokenizer belongs to its checkpoint: never cached
            tokenizer = checkpoint_tokenizer(self.name_or_path, self.trust_remote_code)
            distinct_pad(tokenizer)
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
        model = _load(
            AutoModelForSequenceClassification,
            self.name_or_path,
            self.trust_remote_code,
            self._dtype,
            num_labels=1,
        )
        return _fit_vocab(model, tokenizer)

    def reward_model_from_sft(self, tokenizer: PreTrainedTokenizerBase, path: str | Path):
        """A reward model whose backbone is the causal LM saved at `path` (the SFT artifact) under
        a freshly initialised score head (InstructGPT's RM initialisation, Ouyang et al. 2022)."""
        model = _load(
            AutoModelForSequenceClassification,
            path,
            self.trust_remote_code,
            self._dtype,
            num_labels=1,
        )
        return _fit_vocab(model, tokenizer)

    def trainable(self, model):
        """`model` set up for training: activation checkpointing when the spec asks for it."""
        if self.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        return model

    @property
    def _dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def _tiny_config(self, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
        kwargs = {**TINY_DEFAULTS, **dict(self.config)}
        return LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )


def _load(auto_cls, path, trust_remote_code: bool, dtype: torch.dtype, **kwargs):
    """`auto_cls.from_pretrained(path)`; any failure to read it is one line naming the folder."""
    try:
        return auto_cls.from_pretrained(
            path, trust_remote_code=trust_remote_code, dtype=dtype, **kwargs
        )
    except OSError as err:
        raise ArtifactError(
            f"cannot load a model from '{path}': {_first_line(err)}. Check the path, or the Hub "
            "name (offline machines need a local directory)"
        ) from err
    except Exception as err:  # an invalid config.json, mismatched weights, a broken file
        raise CheckpointError(
            f"cannot load a model from '{path}' ({type(err).__name__}: {_cause(err)})",
            "repair or re-save the checkpoint (config.json and weights from one save_pretrained)",
        ) from None


def checkpoint_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a checkpoint, once the checkpoint is found fit to train: a folder (or Hub
    name) with a config, weights and a tokenizer that turns text into ids the embeddings hold.
    Anything else raises CheckpointError, one line naming `model.name_or_path` and the fix."""
    where = f"model.name_or_path={name_or_path}"
    local = Path(name_or_path).expanduser()
    if not local.exists() and (local.is_absolute() or str(name_or_path).startswith((".", "~"))):
        raise CheckpointError(f"{where}: no such folder", "give the folder holding config.json")
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{where}: no model config ({_first_line(err)})",
            "give a folder made by save_pretrained, or a Hub name (offline: a local folder)",
        ) from None
    except Exception as err:  # transformers' validation of the config (e.g. heads ∤ hidden size)
        raise CheckpointError(
            f"{where}: config.json is invalid ({type(err).__name__}: {_cause(err)})",
            "correct config.json, or save the model again with save_pretrained",
        ) from None
    if local.is_dir() and not any(next(local.glob(p), None) for p in WEIGHTS):
        raise CheckpointError(
            f"{where}: the folder has config.json but no weights (*.safetensors or *.bin)",
            "save the model into it with model.save_pretrained(folder)",
        )
    fix = (
        "save the tokenizer the model was trained with into it (tokenizer.save_pretrained(folder))"
    )
    if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{where}: the folder has no tokenizer (no tokenizer.json)", fix)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as err:  # a broken tokenizer file fails in many ways
        raise CheckpointError(
            f"{where}: no usable tokenizer ({type(err).__name__}: {_first_line(err)})", fix
        ) from None
    _check_tokenizer(tokenizer, config, where)
    return tokenizer


def _check_tokenizer(tokenizer, config, where: str) -> None:
    """Text must become tokens, and every token id must have an embedding row."""
    probe = "Hello world, 42 times."
    if not tokenizer(probe, add_special_tokens=False)["input_ids"]:
        raise CheckpointError(
            f"{where}: the tokenizer turns text into no tokens ({probe!r} -> [])",
            "use the tokenizer saved with the checkpoint (its vocabulary has no tokens for text)",
        )
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise CheckpointError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the embeddings {rows} rows "
            "(config.json vocab_size)",
            "use the tokenizer saved with these weights, or resize the embeddings "
            "(model.resize_token_embeddings(len(tokenizer))) and save both again",
        )


def distinct_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` a pad token that is not EOS (nor BOS): its UNK token when it has one, else
    a new `<pad>` (the embeddings grow to match, `_fit_vocab`).

    Chat checkpoints often ship pad == eos (SmolLM2: `<|im_end|>`). Our stages never read the pad
    id (attention and response masks say what is real), but transformers' sequence classifier
    pools at the last token that is not pad: with pad == eos a saved reward model would be scored
    by transformers and TRL at the token before the closing EOS, while it was trained on the EOS.
    """
    ends = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ends:
        return tokenizer
    unk = tokenizer.unk_token_id
    if unk is not None and unk not in ends:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": PAD})
    return tokenizer


def _cause(err: BaseException) -> str:
    """The message of `err` on one line (validation errors put their cause on later lines)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:400]


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


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


def train_top_layers(model: PreTrainedModel, layers: int) -> PreTrainedModel:
    """Freeze all but the top `layers` transformer blocks, the final norm and the heads: the
    embeddings and lower blocks keep their pretrained weights and need no gradient (less backward
    work and no optimiser state for them). The blocks are the backbone's one `nn.ModuleList` of
    `config.num_hidden_layers` modules (Llama, Qwen2, GPT-2, Pythia, OPT alike)."""
    blocks = transformer_blocks(model)
    if not 0 < layers <= len(blocks):
        raise ConfigError(
            f"rm.trainable_layers={layers} is invalid: this model has {len(blocks)} layers "
            f"(use 1..{len(blocks)}, or null to train all)"
        )
    frozen = {id(p) for block in blocks[: len(blocks) - layers] for p in block.parameters()}
    frozen |= {id(p) for p in model.get_input_embeddings().parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) not in frozen)
    return model


def keep_bottom_layers(model: PreTrainedModel, layers: int) -> PreTrainedModel:
    """Drop all but the bottom `layers` transformer blocks (in place): the final norm and the
    heads then read block `layers`' output. The config says `num_hidden_layers=layers` (and keeps
    as many `layer_types`), so the saved model loads with transformers as it is, and every forward
    and backward runs `layers` blocks instead of all. A middle layer's features, not the last
    (tuned to predict the next token), are often what a classifier on them reads best."""
    blocks = transformer_blocks(model)
    if not 0 < layers <= len(blocks):
        raise ConfigError(
            f"rm.num_layers={layers} is invalid: this model has {len(blocks)} layers "
            f"(use 1..{len(blocks)}, or null to keep all)"
        )
    del blocks[layers:]
    config = model.config.get_text_config()
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    return model


def transformer_blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The backbone's list of transformer blocks (the ModuleList of num_hidden_layers modules)."""
    depth = model.config.get_text_config().num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth:
            return module
    raise ConfigError(f"{type(model).__name__}: no list of {depth} transformer blocks found")


def hf_config(path: str | Path):
    """The transformers config of a saved model (cheap check that an artifact is a model)."""
    return AutoConfig.from_pretrained(path)


def train_without_dropout(model) -> None:
    """Eval mode (no dropout: log p at update time must equal log p at sampling time), with
    activation checkpointing kept on where it is enabled — transformers' layers checkpoint only
    in training mode, so those layers alone (not their dropout or attention) are flagged so."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.eval()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True
