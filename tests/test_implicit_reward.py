"""The policy's implicit reward β·log(p_θ/p_ref) ranks held-out preferences once it nears p*.

By the closed form p* ∝ p_ref·exp(r/β), β·log(p*/p_ref) = r − β·log Z: at the optimum the implicit
reward *is* the reward up to a per-prompt constant, so it should order preference pairs like gold.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import compose

from rlhf_lightning.run import run

ORACLE = [
    "task=oracle",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


@pytest.mark.slow
def test_implicit_reward_accuracy_exceeds_chance_near_the_optimum(tmp_path: Path):
    run(compose(["stage=sft", *ORACLE], tmp_path))
    cfg = compose(
        [
            "stage=policy",
            "algo=exact",
            "reward=gold",
            "algo.beta=0.1",
            "policy.steps=100",
            "policy.optimizer.lr=2e-3",
            "policy.prompts_per_step=4",
            *ORACLE,
        ],
        tmp_path,
    )
    result = run(cfg)
    metrics = next((tmp_path / "run").rglob("metrics.csv"))
    accuracy = [
        float(r["eval/implicit_accuracy"])
        for r in csv.DictReader(metrics.read_text().splitlines())
        if r.get("eval/implicit_accuracy")
    ]
    assert accuracy[0] == pytest.approx(0.5)  # p_θ = p_ref: every implicit reward is 0, a tie
    assert accuracy[-1] > 0.55, accuracy  # held-out labels are BT-noisy: the ceiling is ~0.83
    assert result is not None
