"""bf16 where the hardware computes it natively, fp32 elsewhere.

`bf16-mixed` pays only where bf16 dot products are native: CUDA GPUs from Ampere on, and CPUs with
AVX-512 BF16 or AMX (measured on SmolLM2-135M, forward + backward of [16, 96], 2 threads: 2.0×
faster than fp32 on an AVX-512 BF16 EPYC). Elsewhere PyTorch emulates them, and an AVX2-only CPU
ran the same step ~30× *slower* than fp32 (12 s → 356 s, session 14). So the recipes ask for
``trainer.precision: ${bf16_if_native:${trainer.accelerator}}``, which resolves to ``bf16-mixed``
where bf16 is native and ``32-true`` elsewhere, and an explicit ``bf16`` precision on a CPU that
emulates it runs as asked, with a warning that says what it costs.
"""

from __future__ import annotations

import warnings

BF16 = "bf16-mixed"
FP32 = "32-true"
# what an emulated bf16 costs, said by every warning about it (here and in benchmarks/)
EMULATED = (
    "on a CPU without AVX-512 BF16 or AMX: PyTorch emulates bf16 here (SmolLM2's forward + "
    "backward ran ~30x slower than fp32 on an AVX2-only CPU)"
)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX-512 BF16 or AMX tiles)."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def native_bf16(accelerator: str) -> bool:
    """Whether `accelerator` (a Lightning `trainer.accelerator` value) runs bf16 natively."""
    import torch

    accelerator = str(accelerator).lower()
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if accelerator == "cpu":
        return cpu_has_native_bf16()
    return False  # mps, tpu, …: not measured here, so the safe choice


def bf16_if_native(accelerator: str) -> str:
    """The `${bf16_if_native:…}` resolver: `bf16-mixed` where bf16 is native, else `32-true`."""
    return BF16 if native_bf16(accelerator) else FP32


def warn_if_emulated(trainer) -> None:
    """Warn when a Trainer runs bf16 on a CPU that emulates it (see the module docstring)."""
    from lightning.pytorch.accelerators import CPUAccelerator

    bf16 = str(trainer.precision).startswith("bf16")
    if bf16 and isinstance(trainer.accelerator, CPUAccelerator) and not cpu_has_native_bf16():
        warnings.warn(
            f"trainer.precision={trainer.precision} {EMULATED}; use trainer.precision=32-true, or "
            "'trainer.precision=${bf16_if_native:${trainer.accelerator}}' (the recipes' "
            "default) to pick bf16 only where it is native",
            stacklevel=2,
        )
