"""bf16 only where the hardware computes it (`rlhf_lightning/precision.py`): the recipes' precision
resolves by the CPU's features, and an explicit bf16 on a CPU that emulates it warns."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import compose

from rlhf_lightning import precision
from rlhf_lightning.precision import bf16_if_native, cpu_has_native_bf16, warn_if_emulated

RECIPES = ("smollm2_rm", "smollm2_policy", "smollm2_dpo", "smollm2_beta_sweep")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_native_bf16_agrees_with_the_cpu_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_take_bf16_only_where_it_is_native(monkeypatch, recipe, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    cfg = compose([f"experiment={recipe}"])
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.trainer.precision == ("bf16-mixed" if native else "32-true")


def test_the_resolver_reads_the_accelerator(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert bf16_if_native("cpu") == "bf16-mixed"
    assert bf16_if_native("mps") == "32-true"  # not measured here: the safe choice
    if not torch.cuda.is_available():
        assert bf16_if_native("gpu") == "32-true"  # no GPU: never bf16 for it
        assert bf16_if_native("auto") == "bf16-mixed"  # auto without CUDA is the CPU
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert bf16_if_native("cpu") == "32-true"


@pytest.mark.parametrize(
    ("setting", "native", "warns"),
    [("bf16-mixed", False, True), ("bf16-mixed", True, False), ("32-true", False, False)],
)
def test_bf16_on_a_cpu_that_emulates_it_warns(monkeypatch, setting, native, warns):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=setting, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_emulated(trainer)
    emulated = [w for w in caught if "emulates bf16" in str(w.message)]
    assert len(emulated) == int(warns)
    if warns:
        assert "trainer.precision=32-true" in str(emulated[0].message)  # says how to fix it


def test_a_run_with_bf16_on_an_emulating_cpu_warns_once(monkeypatch, tmp_path):
    """Through `RunContext.trainer`, as train.py builds every stage's Trainer."""
    from rlhf_lightning.context import RunContext

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    cfg = compose(["stage=rm", "trainer.precision=bf16-mixed", "logger=none"], tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RunContext(cfg).trainer("rm", max_epochs=1)
    assert sum("emulates bf16" in str(w.message) for w in caught) == 1
