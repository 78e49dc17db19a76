"""The benchmark scripts run (`--quick`, our side only) and report consistent numbers.

The three scripts start together in subprocesses (a module fixture) so the suite pays their import
time once; each test then checks one script's JSON. TRL is never needed: without it the scripts
print "trl not installed: ours only"; with it, `--ours-only` keeps the run short.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import policy_throughput  # noqa: E402

SCRIPTS = ("rm_throughput", "policy_throughput", "scaling")
HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Start every script with --quick at once; yield name -> (Popen, results dir)."""
    root = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    runs = {}
    for name in SCRIPTS:
        cmd = [
            sys.executable,
            str(BENCH / f"{name}.py"),
            "--quick",
            "--workdir",
            str(root / name / "work"),
            "--results",
            str(root / name / "results"),
        ]
        if HAS_TRL:
            cmd.append("--ours-only")
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        runs[name] = (proc, root / name / "results")
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()


def finished(quick_runs, name: str, compares_trl: bool = True) -> tuple[str, dict]:
    proc, results = quick_runs[name]
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    if compares_trl:
        expected = "--ours-only: ours only" if HAS_TRL else common.TRL_MISSING
        assert expected in output
    return output, json.loads((results / f"{name}.quick.json").read_text())


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_rm_quick_reports_ours_only(quick_runs):
    output, result = finished(quick_runs, "rm_throughput")
    assert list(result["median"]) == ["ours"] and result["ratio_pairs_per_s"] is None
    assert "ours / TRL" not in output
    run = result["runs"]["ours"][0]
    batch = result["spec"]["batch_size"]
    # pairs/s and ms/step are two views of the same steady-state interval
    assert run["throughput"] * run["step_s"] == pytest.approx(batch)
    assert 0 < run["median_step_s"] < run["total_s"]
    assert run["steps"] == result["spec"]["steps"] == 8  # 256 pairs / 32 per step
    assert 0.0 <= run["accuracy"] <= 1.0 and 0.0 <= run["padding_fraction"] < 1.0
    assert positive(run["peak_rss_mb"]) and positive(run["setup_s"])
    assert "reward-model training" in output


def test_policy_quick_reports_phases(quick_runs):
    output, result = finished(quick_runs, "policy_throughput")
    run = result["runs"]["ours"][0]
    spec = result["spec"]
    assert run["throughput"] * run["step_s"] == pytest.approx(spec["prompts"] * spec["k"])
    assert 0 < run["response_length"] <= spec["tokens"] + 0.0  # EOS counts; never past T
    phases = run["phases"]
    for name in policy_throughput.PHASES:  # nested timers: every remainder is non-negative
        assert phases[name] >= -1e-3, (name, phases)
    assert phases["rollout_other"] >= -1e-3
    parts = sum(phases[n] for n in (*policy_throughput.PHASES, "rollout_other"))
    assert parts == pytest.approx(phases["step"], rel=1e-6)
    assert "time per step by phase" in output


def test_scaling_quick_covers_both_sweeps(quick_runs):
    _, result = finished(quick_runs, "scaling", compares_trl=False)
    points = [(p["sweep"], p["prompts"], p["tokens"]) for p in result["points"]]
    assert points == [("batch", 2, 4), ("batch", 4, 4), ("length", 2, 4), ("length", 2, 8)]
    centre = [p for p in result["points"] if (p["prompts"], p["tokens"]) == (2, 4)]
    assert centre[0]["step_s"] == centre[1]["step_s"]  # one measurement serves both sweeps
    for point in result["points"]:
        assert point["completions_per_step"] == point["prompts"] * 2  # quick k=2
        assert point["completions_per_s"] == pytest.approx(
            point["completions_per_step"] / point["step_s"]
        )
        assert 0 < point["generate_share"] < 1 and 0 < point["update_share"] < 1


def test_step_clock_steady_interval():
    clock = common.StepClock()
    clock.started = 10.0
    clock.ends = [11.0, 11.5, 12.5, 13.0]
    assert clock.steady(0) == (4, 3.0)  # from the start of training
    assert clock.steady(2) == (2, 1.5)  # from the end of step 2 to the end of step 4
    with pytest.raises(RuntimeError, match="need more than warmup"):
        clock.steady(4)


def test_phase_timer_skips_warmup_and_averages():
    timer = policy_throughput.PhaseTimer()
    for generate, step in [(5.0, 9.0), (1.0, 2.0), (3.0, 4.0)]:
        timer.current["generate"] = generate
        timer.close_step(step)
    summary = timer.summary(1, lambda s: {**s, "other": s["step"] - s["generate"]})
    assert summary == {"generate": 2.0, "other": 1.0, "step": 3.0}


def test_trl_tokenizer_gives_our_ids(tmp_path):
    """TRL's text route (prompt + response + EOS text, BOS-only tokenizer) == our encoding."""
    from transformers import AutoTokenizer

    from rlhf_lightning.data.preference import encode_pair
    from rlhf_lightning.data.records import PreferenceRecord

    ws = common.prepare_workspace(tmp_path, common.task_settings(32, 8, 0), seed=0)
    ours = AutoTokenizer.from_pretrained(ws.tokenizer_dir)
    trl = AutoTokenizer.from_pretrained(ws.trl_tokenizer_dir)
    rows = common.read_jsonl(Path(ws.data_dir) / "reviews" / "prefs_train.jsonl")
    for row in rows:
        encoded = encode_pair(ours, PreferenceRecord(**row), max_length=128)
        for side in ("chosen", "rejected"):
            text = row["prompt"] + row[side] + trl.eos_token
            assert trl(text=text)["input_ids"] == encoded[side]
    assert trl(text="review :")["input_ids"][-1] != trl.eos_token_id  # prompts stay open
