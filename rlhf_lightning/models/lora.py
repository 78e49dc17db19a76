"""LoRA for the policy stage: train a low-rank adapter, use the adapter-free model as reference.

With `model.lora` set, the policy is the SFT model with a LoRA adapter on its linear layers
(Hu et al. 2021, https://arxiv.org/abs/2106.09685): each adapted weight W [out, in] computes
    W x + (alpha / r) · B A x,    A [r, in] random, B [out, r] = 0 at init,
and only A and B train. With the adapter switched off the same network *is* the SFT model, so the
reference p_ref is that network under `disable_adapter()`: one copy of the weights, not two.
`AdapterDisabledReference` presents it as a frozen model; `export_for_saving` folds B·A into W
(on a copy) so the policy artifact is an ordinary transformers checkpoint.

peft is optional (`pip install -e .[peft]`) and imported only when `model.lora` is set.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlhf_lightning.errors import ConfigError

EXAMPLE = "e.g. model.lora={r:8,alpha:16}"
ADAPTER_MARK = "lora_"  # peft names every adapter parameter lora_A/lora_B/lora_embedding_*


@dataclass(frozen=True)
class LoraSettings:
    """`model.lora`. r: adapter rank. alpha: the update is scaled by alpha / r (default 2·r).
    dropout: on the adapter input; 0 because log p must not change between sampling and update.
    target_modules: module names (or a regex) to adapt; "all-linear" is every linear layer but
    the output head (for Llama: q/k/v/o_proj and gate/up/down_proj)."""

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else 2 * self.r) / self.r


def lora_settings(cfg: Mapping[str, Any] | None) -> LoraSettings | None:
    """Validate `model.lora` (None: no LoRA); each problem is one ConfigError line with the fix."""
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model.lora: expected a mapping or null, got {cfg!r} ({EXAMPLE})")
    allowed = LoraSettings.__dataclass_fields__
    for key in cfg:
        if key not in allowed:
            raise ConfigError(
                f"model.lora.{key}: unknown key; LoRA keys are {', '.join(allowed)} ({EXAMPLE})"
            )
    settings = LoraSettings(**{k: _check(k, v) for k, v in cfg.items()})
    require_peft()
    return settings


def _check(key: str, value: Any) -> Any:
    """The value of `model.lora.<key>`, converted, or a ConfigError saying what is allowed."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if key == "r" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"model.lora.r: must be an integer >= 1, got {value!r} ({EXAMPLE})")
    if key == "alpha" and value is not None and not (number and value > 0):
        raise ConfigError(f"model.lora.alpha: must be a number > 0, got {value!r} ({EXAMPLE})")
    if key == "dropout" and not (number and 0 <= value < 1):
        raise ConfigError(
            f"model.lora.dropout: must be in [0, 1), got {value!r} (e.g. model.lora.dropout=0, "
            "which keeps log p exact between sampling and update)"
        )
    if key == "target_modules":
        names = (value,) if isinstance(value, str) else tuple(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(
                f"model.lora.target_modules: must be all-linear or a list of module names, got "
                f"{value!r} (e.g. model.lora.target_modules=[q_proj,v_proj])"
            )
        return value if isinstance(value, str) else names
    return value


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "model.lora is set but peft is not installed: run `pip install -e .[peft]` "
            "(or set model.lora=null)"
        ) from err


def add_lora(
    model: nn.Module,
    settings: LoraSettings,
    task_type: str = "CAUSAL_LM",
    exclude: tuple[str, ...] = (),
):
    """`model` wrapped in a fresh LoRA adapter (peft `PeftModel`); only the adapter trains.
    exclude: module names never adapted (a reward model's new `score` head trains whole)."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules
    config = LoraConfig(
        task_type=task_type,
        r=settings.r,
        lora_alpha=settings.scale * settings.r,
        lora_dropout=settings.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        exclude_modules=list(exclude) or None,
        bias="none",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(
            f"model.lora.target_modules: {err} (name linear layers of this model, or all-linear)"
        ) from err


def reward_model_with_lora(model: nn.Module, settings: LoraSettings):
    """A reward model (`...ForSequenceClassification`) training a LoRA adapter on its backbone and
    its whole score head (new, so it must train). The head stays a plain `nn.Linear` (not peft's
    `modules_to_save` wrapper), so `reward_scores` keeps its float32 score path;
    `export_for_saving` merges the adapter into an ordinary checkpoint."""
    wrapped = add_lora(model, settings, task_type="FEATURE_EXTRACTION", exclude=("score",))
    wrapped.get_base_model().score.weight.requires_grad_(True)
    return wrapped


class AdapterDisabledReference:
    """The frozen reference p_ref: the policy's `PeftModel` run with its adapter disabled.

    It holds no weights of its own. Calls (`__call__`/`forward`, `generate`) run the shared network
    under `disable_adapter()`, in eval mode and without grad; the policy's train/eval modes and
    `requires_grad` flags are put back exactly afterwards (peft's context re-enables adapter grads
    on exit whatever they were). `eval`, `train`, `requires_grad_(False)` and `to` only satisfy the
    frozen-model protocol and change nothing of the policy: its weights move with the policy.
    """

    def __init__(self, policy: nn.Module):
        self.policy = policy
        self.training = False

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        with self.adapter_off():
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.adapter_off():
            return self.policy.generate(*args, **kwargs)

    def eval(self) -> AdapterDisabledReference:
        return self.train(False)

    def train(self, mode: bool = True) -> AdapterDisabledReference:
        self.training = mode  # recorded for callers that restore it; calls always run in eval
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdapterDisabledReference:
        if requires_grad:
            raise RuntimeError("the LoRA reference is the frozen base model: it cannot train")
        return self

    def to(self, *args, **kwargs) -> AdapterDisabledReference:
        return self

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The weights the reference computes with: the policy's, less the adapter's."""
        for name, param in self.policy.named_parameters():
            if ADAPTER_MARK not in name:
                yield name, param

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    @property
    def config(self):
        return self.policy.config

    @property
    def generation_config(self):
        return self.policy.generation_config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def __repr__(self) -> str:
        return f"AdapterDisabledReference({type(self.policy.get_base_model()).__name__})"

    @contextlib.contextmanager
    def adapter_off(self) -> Iterator[None]:
        modes = [(m, m.training) for m in self.policy.modules()]
        grads = [(p, p.requires_grad) for p in self.policy.parameters()]
        try:
            self.policy.eval()
            with torch.no_grad(), self.policy.disable_adapter():
                yield
        finally:
            for module, mode in modes:
                module.training = mode
            for param, flag in grads:
                param.requires_grad_(flag)


def policy_and_reference(
    model_spec, tokenizer, path=None
) -> tuple[nn.Module, nn.Module | AdapterDisabledReference]:
    """The policy to train and its frozen reference, both loaded from `path` (the SFT artifact).

    Without `model.lora`: two independent copies of the model. With it: policy = LoRA adapter
    on the loaded weights (`PeftModel`), reference = `AdapterDisabledReference(policy)`.
    """
    settings = model_spec.lora_settings
    policy = model_spec.causal_lm(tokenizer, path=path)
    if settings is None:
        return policy, model_spec.causal_lm(tokenizer, path=path)
    policy = add_lora(policy, settings)
    return policy, AdapterDisabledReference(policy)


def export_for_saving(policy: nn.Module) -> nn.Module:
    """What to `save_pretrained` for the policy artifact: a plain transformers model.

    A `PeftModel` is deep-copied and its adapter merged into the copy (W ← W + (alpha/r)·B·A);
    the live policy stays unmerged and trainable. The copy costs one more set of the base weights
    while it exists. Any other model is returned as it is.
    """
    try:
        from peft import PeftModel
    except ImportError:  # no peft, so no adapter
        return policy
    if not isinstance(policy, PeftModel):
        return policy
    return copy.deepcopy(policy).merge_and_unload()
