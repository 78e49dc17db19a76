"""Model introspection: which transformers model to split into backbone and output head, whether
its logits are exactly head(backbone(x)), and the float64 probes that decide fast paths.

A probe judges the computation, not its round-off: it runs once per model object on float64
copies of the weights (`probing`), compares with `agree` (float64 round-off), and caches its
verdict on the model (`_rlhf_*` attributes).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only (left padding gets 0), as `generate` counts them:
    the one convention every forward over left-padded rows follows."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def accepts(model, name: str) -> bool:
    """Whether the model's `forward` (the LoRA reference's policy's) takes keyword `name`."""
    target = getattr(model, "policy", model)  # the LoRA reference wraps its policy
    try:
        return name in inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return False


def head_model(model):
    """(the transformers model to split into backbone and head, the context to call it in), or
    (None, a null context) for models we only call whole (FSDP-wrapped, foreign callables)."""
    from rlhf_lightning.models.lora import AdapterDisabledReference

    if isinstance(model, AdapterDisabledReference):
        return unwrap_peft(model.policy), model.adapter_off()
    inner = unwrap_peft(model)
    if isinstance(inner, PreTrainedModel):
        return inner, contextlib.nullcontext()
    return None, contextlib.nullcontext()


def unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@contextlib.contextmanager
def probing(hf, float64: bool = False):
    """Eval mode, no grad and no autocast for a one-time probe; every module's train/eval flag
    restored after (the policy's checkpointed layers keep theirs).

    float64: for the probe, every floating parameter and buffer is replaced by a float64 copy (one
    per tensor, so tied weights stay tied), and the original objects are put back after. A probe
    then judges the computation, not its round-off: 30 layers of float32 round-off put
    SmolLM2-135M's states 1–2e-3 apart at magnitude ~55, and bfloat16 far more, though shared-prefix
    and plain passes are the same maths. The originals are never modified: DDP hangs its gradient
    hooks on their accumulators, which a dtype change of `.data` would drop (no more all-reduce).
    And in float64 attention runs SDPA's math kernel: the CPU flash kernel's float64 results depend
    on the key length it blocks over on some CPUs (an AVX2-only EPYC: a cached shared-prefix pass
    3.6e-6 from the plain one on SmolLM2, where the math kernel gives 0), which is the kernel's
    round-off, not the computation the probe judges.
    """
    modes = [(m, m.training) for m in hf.modules()]
    device = next(hf.parameters()).device
    swapped: list[tuple[dict, str, Tensor]] = []  # (module._parameters or _buffers, name, original)
    try:
        hf.eval()
        if float64:
            copies: dict[int, Tensor] = {}
            for module in hf.modules():
                for table in (module._parameters, module._buffers):
                    for name, tensor in list(table.items()):
                        if tensor is None or not tensor.is_floating_point():
                            continue
                        if id(tensor) not in copies:
                            double = tensor.detach().to(torch.float64)
                            is_param = isinstance(tensor, torch.nn.Parameter)
                            copies[id(tensor)] = (
                                torch.nn.Parameter(double, requires_grad=False)
                                if is_param
                                else double
                            )
                        swapped.append((table, name, tensor))
                        table[name] = copies[id(tensor)]
        kernels = sdpa_kernel(SDPBackend.MATH) if float64 else contextlib.nullcontext()
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False), kernels:
            yield
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original
        for module, mode in modes:
            module.training = mode


def agree(a: Tensor, b: Tensor) -> bool:
    """Equal up to float64 round-off (probes compare float64 computations)."""
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-9))


def head_is_exact(hf: PreTrainedModel) -> bool:
    """Whether hf's logits are exactly head(backbone(x)) — checked once per model object on a
    4-token input in eval mode and float64 (soft-capping or logit scaling would fail it)."""
    cached = getattr(hf, "_rlhf_head_is_exact", None)
    if cached is not None:
        return cached
    if hf.base_model is hf or hf.get_output_embeddings() is None:  # no backbone + head to call
        hf._rlhf_head_is_exact = False
        return False
    device = next(hf.parameters()).device
    ids = torch.arange(4, device=device)[None] % hf.get_input_embeddings().num_embeddings
    try:
        with probing(hf, float64=True):
            whole = hf(input_ids=ids).logits
            split = hf.get_output_embeddings()(hf.base_model(input_ids=ids).last_hidden_state)
            exact = agree(whole, split)
    except Exception:  # an unusual architecture: use its own forward
        exact = False
    hf._rlhf_head_is_exact = bool(exact)
    return hf._rlhf_head_is_exact


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether a module of `model` recomputes its forward in the backward pass (activation
    checkpointing on, in training mode): a pass must then save what the recomputation saves."""
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())
