"""`eval.py` and `rlhf_lightning.evaluate`: hand-checked statistics, then end-to-end runs on tiny
artifacts (a quiet `train.py` pipeline, made once per module) — the default policy-vs-SFT report,
a plain `save_pretrained` folder this project did not write, `mode=rm`, a paired compare."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import (
    HEAVY,
    REPO,
    TINY_MODEL,
    TINY_TASK,
    TINY_TRAINING,
    read_wandb_history,
    script_cli,
)
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import open_dict

from rlhf_lightning.errors import ArtifactError
from rlhf_lightning.evaluate import stats

# What a tiny evaluation overrides: the TINY task sizes (the same data files), few samples.
TINY_EVAL = [
    *TINY_TASK,
    "samples_per_prompt=2",
    "generation.max_new_tokens=12",
    "best_of_n.max_samples=8",
    "best_of_n.n_prompts=4",
    "bootstrap.n_resamples=200",
    "n_show=3",
]


# ---- statistics, checked by hand ----------------------------------------------------------------


def test_bootstrap_of_a_constant_is_that_constant():
    e = stats.bootstrap([2.5] * 7)
    assert (e.mean, e.lo, e.hi) == (2.5, 2.5, 2.5)


def test_bootstrap_distribution_of_two_values_is_binomial():
    # resampling {0, 1} twice: mean 0, ½, 1 with probability ¼, ½, ¼
    draws = stats.bootstrap_distribution([0.0, 1.0], n_resamples=20000, seed=1)
    assert set(np.unique(draws)) == {0.0, 0.5, 1.0}
    assert [np.mean(draws == v) for v in (0.0, 0.5, 1.0)] == pytest.approx(
        [0.25, 0.5, 0.25], abs=0.01
    )
    e = stats.bootstrap([0.0, 1.0], n_resamples=20000, seed=1)
    assert (e.mean, e.lo, e.hi) == (0.5, 0.0, 1.0)


def test_bootstrap_resamples_prompts_not_samples():
    # two samples of prompt 0 (both 1), one of prompt 1 (0): a resample draws prompts, so the
    # means are (1+1+1+1)/4, (1+1+0)/3 or 0/2 with probability ¼, ½, ¼
    draws = stats.bootstrap_distribution([1.0, 1.0, 0.0], groups=[0, 0, 1], n_resamples=20000)
    assert set(np.round(np.unique(draws), 12)) == {0.0, round(2 / 3, 12), 1.0}
    assert np.mean(np.isclose(draws, 2 / 3)) == pytest.approx(0.5, abs=0.01)
    assert stats.bootstrap([1.0, 1.0, 0.0], groups=[0, 0, 1]).mean == pytest.approx(2 / 3)
    assert stats.group_ids(["b", "a", "b"]).tolist() == [0, 1, 0]


def test_bootstrap_is_reproducible_and_estimate_excludes():
    values = np.random.default_rng(0).normal(size=50)
    assert stats.bootstrap(values, seed=3) == stats.bootstrap(values, seed=3)
    e = stats.Estimate(0.2, 0.1, 0.3)
    assert e.excludes(0.0) and not e.excludes(0.25) and not stats.Estimate(1.0).excludes(0.0)
    assert f"{e:.2f}" == "0.20 [0.10, 0.30]"


def test_win_rates_count_ties_half_and_skip_pairs_sharing_a_key():
    # k = 2: pairs (a0, b1) = (1 vs 0) win, (a1, b0) = (2 vs 2) tie -> ¾; (a0,b0), (a1,b1) share keys
    assert stats.win_rates([[1.0, 2.0]], [[2.0, 0.0]]).tolist() == [0.75]
    # k = 1: the one keyed pair
    assert stats.win_rates([[3.0], [1.0], [0.0]], [[1.0], [1.0], [2.0]]).tolist() == [1.0, 0.5, 0.0]
    # a side against itself: every pair (i, j) has its mirror (j, i): exactly ½
    a = np.random.default_rng(0).normal(size=(5, 4))
    assert stats.win_rates(a, a).tolist() == [0.5] * 5


def test_pairwise_confidence_folds_the_margin():
    confidence, correct = stats.pairwise_confidence([0.0, math.log(3), -math.log(3)])
    assert confidence.tolist() == pytest.approx([0.5, 0.75, 0.75])  # σ(log 3) = 3/4
    assert correct.tolist() == [0.5, 1.0, 0.0]


def test_expected_calibration_error_by_hand():
    confidence, correct = [0.57, 0.66, 0.97, 0.97], [1.0, 0.0, 1.0, 0.0]
    # bins of width 0.05 from 0.5: {0.57}, {0.66}, {0.97, 0.97}
    expected = 0.25 * abs(1 - 0.57) + 0.25 * abs(0 - 0.66) + 0.5 * abs(0.5 - 0.97)
    assert stats.expected_calibration_error(confidence, correct) == pytest.approx(expected)
    bins = stats.reliability_bins(confidence, correct)
    assert [b["count"] for b in bins] == [0, 1, 0, 3 - 2, 0, 0, 0, 0, 0, 2]
    assert bins[9]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.97)
    e = stats.bootstrap_ece(confidence, correct, n_resamples=500)
    assert e.mean == pytest.approx(expected) and 0 <= e.lo <= e.hi <= 1
    # perfectly calibrated: confidence 3/4, right 3 times in 4
    assert stats.expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)


def test_degenerate_flags():
    assert stats.has_repeated_ngram("good and good and good", 3)  # "good and good" twice
    assert not stats.has_repeated_ngram("the plot was good and the acting was bad", 3)
    flags = stats.degenerate_flags(["a b c a b c", "a b c ."], [1.0, 0.0], n=3)
    assert flags["repeated_ngram"].tolist() == [1.0, 0.0]
    assert flags["no_end"].tolist() == [0.0, 1.0]
    assert flags["degenerate"].tolist() == [1.0, 1.0]
    fixed = stats.degenerate_flags(["x y z"], [0.0], n=3, need_end=False)  # fixed-length task
    assert fixed["degenerate"].tolist() == [0.0]


def test_shuffle_words_keeps_the_words_the_last_and_the_leading_space():
    import random

    from rlhf_lightning.evaluate.rm import shuffle_words

    text = " the plot was very good but the ending felt slow ."
    out = shuffle_words(text, random.Random(3))
    assert out != text and out.startswith(" ") and out.endswith(" .")
    assert sorted(out.split()) == sorted(text.split())
    assert shuffle_words(" fine .", random.Random(0)) == " fine ."  # nothing to shuffle


class _Judge:
    """A stand-in reward model: `score(response)` for every response, as `LearnedReward.raw`."""

    def __init__(self, score):
        self.score = score

    def raw(self, prompts, responses):
        import torch

        return torch.tensor([self.score(r) for r in responses], dtype=torch.float64)


def test_word_order_probe_tells_a_bag_of_words_judge_from_a_reader():
    from rlhf_lightning.data.records import PreferenceRecord
    from rlhf_lightning.evaluate.rm import word_order_probe
    from rlhf_lightning.tasks import reviews_grammar as grammar
    from rlhf_lightning.tasks.reviews import ReviewsTask

    rng = __import__("random").Random(0)
    pairs = [
        PreferenceRecord("review of :", grammar.sample_response(rng), grammar.sample_response(rng))
        for _ in range(64)
    ]
    task = ReviewsTask()

    def probe(score):
        judge = _Judge(score)
        scores = tuple(
            judge.raw(None, [getattr(p, s) for p in pairs]).numpy() for s in ("chosen", "rejected")
        )
        return {
            k: float(v.mean()) for k, v in word_order_probe(judge, task, pairs, scores, 0).items()
        }

    bag = probe(lambda r: sum(grammar.ADJECTIVES.get(w, 0.0) for w in r.split()))
    assert bag["order_sensitivity"] == 0.0 and bag["order_preference"] == 0.5  # ties: one half
    reader = probe(grammar.gold_score)  # gold reads sentences: a shuffle breaks them
    assert reader["order_preference"] == reader["gold_order_preference"] > 0.9
    assert reader["order_sensitivity"] > 0.5


def test_eos_probe_rescores_every_response_without_its_closing_eos():
    """A judge that reads length with the closing EOS and its opposite without: accuracy as an
    online trainer without the EOS reads it is the complement; the shift is |2·len| / std."""
    import numpy as np
    import torch

    from rlhf_lightning.data.records import PreferenceRecord
    from rlhf_lightning.evaluate.rm import eos_probe

    class Judge:
        def raw(self, prompts, responses, ended=None):
            sign = [1.0 if ended is None or e else -1.0 for e in (ended or [True] * len(responses))]
            return torch.tensor([s * len(r) for s, r in zip(sign, responses)], dtype=torch.float64)

    pairs = [PreferenceRecord("p", "a" * (i + 2), "b" * (i % 3 + 1)) for i in range(6)]
    judge = Judge()
    scores = tuple(
        judge.raw(None, [getattr(p, s) for p in pairs]).numpy() for s in ("chosen", "rejected")
    )
    out = eos_probe(judge, pairs, scores)
    accuracy = (scores[0] > scores[1]) + 0.5 * (scores[0] == scores[1])
    assert np.array_equal(out["accuracy_without_eos"], 1.0 - accuracy)
    scale = np.concatenate(scores).std()
    expected = (2 * np.abs(scores[0]) + 2 * np.abs(scores[1])) / 2 / scale
    assert np.allclose(out["eos_sensitivity"], expected)


def test_checkpoint_arguments_are_read_as_checkpoint_keys():
    spec = importlib.util.spec_from_file_location("eval_entry", REPO / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["policy=./my", "reference=x", "compare=y", "reward_model=z", "mode=rm", "task=oracle"]
    assert module.checkpoint_overrides(args) == [
        "checkpoints.policy=./my",
        "checkpoints.reference=x",
        "checkpoints.compare=y",
        "checkpoints.reward_model=z",
        "mode=rm",
        "task=oracle",
    ]


# ---- end to end on tiny artifacts ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TINY `python train.py` pipeline with the default logger (wandb, offline) and a fresh
    matplotlib cache: its artifacts for the tests below, and what it printed."""
    root = tmp_path_factory.mktemp("eval_root")
    args = [*TINY_TASK, *TINY_MODEL, *(a for a in TINY_TRAINING if a != "logger=csv")]
    proc = script_cli("train.py", args, root, env={"MPLCONFIGDIR": str(root / "mplconfig")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def compose_eval(overrides: list[str], root: Path, output_dir: Path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("eval", overrides=[*TINY_EVAL, *overrides])
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.output_dir = str(output_dir)
    return cfg


def _run_eval(overrides, root, tmp_path):
    from rlhf_lightning.evaluate.run import run_eval

    out = tmp_path / "eval"
    run_eval(compose_eval(overrides, root, out))
    return json.loads((out / "eval.json").read_text()), out


@pytest.mark.slow
def test_default_train_run_is_quiet_and_names_what_to_open(trained):
    _, proc = trained
    output = proc.stdout + proc.stderr
    for noise in ("DeprecationWarning", "FutureWarning", "is deprecated", "wandb: WARNING"):
        assert noise not in output, output
    assert not [line for line in output.splitlines() if "][INFO]" in line or " INFO " in line]
    # nothing but our own lines: no library prints at all (TINY turns the progress bar off)
    assert proc.stderr == ""
    ours = ("== ", "[sft] ", "[rm] ", "[policy] ", "run directory: ", "plots: ", "reports: ")
    ours += ("wandb (offline): ", "next: python eval.py")
    assert [line for line in proc.stdout.splitlines() if line and not line.startswith(ours)] == []
    for stage, number in (("sft", 1), ("rm", 2), ("policy", 3)):
        assert f"== [{number}/3] {stage}:" in proc.stdout
    assert "plots: " in proc.stdout and "overoptimisation.png" in proc.stdout
    assert "reports: " in proc.stdout and "result.json" in proc.stdout
    assert "wandb sync " in proc.stdout and "next: python eval.py" in proc.stdout


@pytest.mark.slow
def test_eval_cli_reports_policy_against_sft(trained):
    root, _ = trained
    proc = script_cli("eval.py", TINY_EVAL, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeprecationWarning" not in proc.stderr and "FutureWarning" not in proc.stderr
    assert "| policy over reference |" in proc.stdout and "wandb sync " in proc.stdout
    run_dir = Path(proc.stdout.split("run directory: ")[1].split()[0])
    assert run_dir.parent == root / "outputs" / "eval"
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["checkpoints"]["policy"].endswith("artifacts/reviews/policy")
    assert result["judges"] == ["learned", "gold"]
    for judge in ("learned", "gold"):
        e = result["win_rates"][f"policy_vs_reference/{judge}"]
        assert 0 <= e["lo"] <= e["mean"] <= e["hi"] <= 1
    policy = result["sides"]["policy"]
    for key in (
        "reward/learned",
        "reward/gold",
        "kl",
        "kl_k3",
        "response_length",
        "eos_rate",
        "degenerate",
    ):
        assert policy[key]["lo"] <= policy[key]["mean"] <= policy[key]["hi"], key
    assert result["sides"]["reference"]["kl"]["mean"] == 0.0  # KL of the reference to itself
    bon = result["best_of_n"]
    assert bon["n_samples"] <= 8 and bon["curve"]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("[eval] best-of-n baseline"))
    assert f"({bon['n_samples'] * bon['n_prompts']} samples, ~" in line and "samples/s" in line
    for name in ("eval.md", "samples.jsonl", "win_rates.png", "reward_kl.png", "rewards.png"):
        assert (run_dir / name).stat().st_size > 0, name
    history = read_wandb_history(run_dir)
    assert history["eval/win_rate/policy_vs_reference/gold"] == [
        pytest.approx(result["win_rates"]["policy_vs_reference/gold"]["mean"])
    ]
    assert "eval/policy/kl_lo" in history


@pytest.mark.slow
def test_eval_of_a_plain_save_pretrained_folder(trained, tmp_path):
    """A GPT-2 this project never wrote (no manifest, another architecture, no pad token),
    judged against our SFT artifact."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    root, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(root / "artifacts/reviews/tokenizer")
    tokenizer.pad_token = None
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    folder = tmp_path / "someone-elses-model"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not (folder / "rlhf_artifact.json").exists()
    result, out = _run_eval(
        [f"checkpoints.policy={folder}", "logger=csv", "best_of_n.enabled=false"], root, tmp_path
    )
    assert result["checkpoints"]["policy"] == str(folder)
    assert result["sides"]["policy"]["kl_k3"]["mean"] > 0  # k3 ≥ 0, and 0 only for p_θ = p_ref
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert any(r["policy"] != r["reference"] for r in rows)
    metrics = (out / "csv" / "eval" / "metrics.csv").read_text()
    assert "eval/win_rate/policy_vs_reference/gold" in metrics


@pytest.mark.slow
def test_eval_rm_mode_accuracy_calibration_and_reliability_plot(trained, tmp_path):
    root, _ = trained
    result, out = _run_eval(["mode=rm", "logger=tensorboard"], root, tmp_path)
    metrics = result["metrics"]
    assert result["n_pairs"] == 64  # the task's test pairs (task.n_pairs_test=64)
    keys = ("accuracy", "gold_agreement", "label_gold_agreement", "bayes_accuracy")
    for key in (*keys, "order_preference", "gold_order_preference"):
        assert 0 <= metrics[key]["lo"] <= metrics[key]["mean"] <= metrics[key]["hi"] <= 1, key
    assert metrics["gold_order_preference"]["mean"] > 0.9  # shuffled reviews break the grammar
    parts = [metrics[f"accuracy/{name}"] for name in ("well_formed", "malformed")]
    assert sum(p["n"] for p in parts) == 64  # every pair in one of the two
    weighted = sum(p["mean"] * p["n"] for p in parts) / 64
    assert weighted == pytest.approx(metrics["accuracy"]["mean"])
    assert "pairs with a malformed response" in (out / "eval.md").read_text()
    assert metrics["order_sensitivity"]["mean"] >= 0
    assert 0 <= metrics["accuracy_without_eos"]["mean"] <= 1  # eos_probe: each pair again
    assert metrics["eos_sensitivity"]["mean"] > 0  # the score head reads at the closing EOS
    assert "without its closing EOS" in (out / "eval.md").read_text()
    card = json.loads((root / "data/reviews/card.json").read_text())
    assert metrics["bayes_accuracy"]["mean"] == pytest.approx(
        card["bayes_accuracy"]["test"], abs=1e-5
    )
    expected = metrics["expected_accuracy"]["mean"]
    assert 1 - metrics["bayes_accuracy"]["mean"] <= expected <= metrics["bayes_accuracy"]["mean"]
    assert "expected accuracy over the labels' draw" in (out / "eval.md").read_text()
    assert metrics["label_gold_agreement"]["mean"] == pytest.approx(
        card["label_gold_agreement"]["test"], abs=1e-5
    )
    assert 0 <= result["ece"]["mean"] <= 1
    assert sum(b["count"] for b in result["reliability"]) == 64
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "rm_rewards.png").exists() and "expected calibration error" in (
        out / "eval.md"
    ).read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "eval"))
    events.Reload()
    logged = events.Scalars("eval/rm/accuracy")
    assert [e.value for e in logged] == [pytest.approx(metrics["accuracy"]["mean"])]
    assert "eval/reliability" in events.Tags()["images"]


@pytest.mark.slow
def test_eval_rm_mode_reads_any_preference_file(trained, tmp_path):
    root, _ = trained
    pairs = tmp_path / "mine.jsonl"
    rows = [
        {
            "prompt": "review of the silent harbor :",
            "chosen": " the plot was great .",
            "rejected": " the plot was bad .",
        }
    ] * 3
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result, _ = _run_eval(["mode=rm", f"pairs={pairs}", "logger=none"], root, tmp_path)
    assert result["n_pairs"] == 3 and result["n_distinct_prompts"] == 1
    assert (
        result["metrics"]["gold_agreement"]["mean"] == 1.0
        or result["metrics"]["gold_agreement"]["mean"] == 0.0
    )


@pytest.mark.slow
def test_compare_of_a_policy_with_itself_is_within_noise(trained, tmp_path):
    root, _ = trained
    policy = root / "artifacts/reviews/policy"
    result, out = _run_eval(
        [f"checkpoints.compare={policy}", "logger=none", "best_of_n.enabled=false"], root, tmp_path
    )
    assert result["sides"]["compare"] == result["sides"]["policy"]  # same prompts, same keys
    for name, e in result["paired"].items():
        assert (e["mean"], e["beyond_noise"]) == (0.0, False), name
    assert result["win_rates"]["policy_vs_compare/gold"]["mean"] == 0.5
    assert "policy − compare" in (out / "eval.md").read_text()


def test_missing_policy_artifact_names_the_command(tmp_path):
    from rlhf_lightning.evaluate.context import EvalContext

    ctx = EvalContext(compose_eval(["logger=none"], tmp_path, tmp_path / "out"))
    with pytest.raises(ArtifactError, match=r"run `python train\.py` first"):
        ctx.checkpoint("policy")
    with pytest.raises(ArtifactError, match="not a model folder"):
        EvalContext(
            compose_eval([f"checkpoints.policy={tmp_path}"], tmp_path, tmp_path / "out")
        ).checkpoint("policy")


@pytest.mark.slow
def test_eval_cli_error_is_one_line_with_exit_code_2(tmp_path):
    proc = script_cli("eval.py", ["logger=none", *TINY_TASK], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: missing policy artifact")
    assert "python train.py" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # an eval.py subprocess
def test_a_bad_eval_value_fails_before_torch_is_imported(tmp_path):
    """eval.py checks its config before torch, transformers or Lightning are imported (here they
    cannot be): one line, exit 2, nothing evaluated."""
    proc = script_cli("eval.py", ["logger=none", "samples_per_prompt=0"], tmp_path, without=HEAVY)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        "error: samples_per_prompt=0 is invalid: expected an integer > 0"
    ), proc.stderr[-2000:]
    assert not (tmp_path / "data").exists() and not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize(
    "override, named",
    [
        ("mode=policies", "mode="),
        ("samples_per_prompt=0", "samples_per_prompt"),
        ("best_of_n.max_samples=-2", "best_of_n.max_samples"),
        ("data=jsonl", "data.path"),
    ],
)
def test_bad_eval_value_fails_in_one_line_naming_the_key(override, named, tmp_path):
    from rlhf_lightning.config import validate_eval
    from rlhf_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=named) as err:
        validate_eval(compose_eval([override], tmp_path, tmp_path / "out"))
    assert "\n" not in str(err.value)


def test_rm_accuracy_per_deciding_term_partitions_the_pairs():
    """`eval.py mode=rm` on a task with `gold_terms`: each pair counted under the term whose
    contribution differs most between its responses; accuracy per term adds up to the whole."""
    import numpy as np

    from rlhf_lightning.evaluate.rm import by_deciding_term

    class Task:
        def gold_terms(self, prompts, responses):
            return {
                "end": [0.0 if r.endswith(".") else -1.0 for r in responses],
                "warmth": [0.3 * r.count("love") for r in responses],
            }

    pairs = [
        SimpleNamespace(prompt="p0", chosen="I love it.", rejected="I love it"),  # end decides
        SimpleNamespace(prompt="p1", chosen="love love.", rejected="ok."),  # warmth decides
        SimpleNamespace(prompt="p2", chosen="love.", rejected="ok."),  # warmth
        SimpleNamespace(prompt="p3", chosen="same.", rejected="same."),  # nothing differs: none
    ]
    correct = np.array([1.0, 0.0, 1.0, 1.0])
    values = {"accuracy": correct, "gold_agreement": correct}
    found = by_deciding_term(Task(), pairs, values, np.arange(4), {"n_resamples": 50, "seed": 0})
    assert found["accuracy/decided_by_end"]["n"] == 1
    assert found["accuracy/decided_by_end"]["mean"] == 1.0
    assert found["accuracy/decided_by_warmth"]["n"] == 2
    assert found["accuracy/decided_by_warmth"]["mean"] == 0.5
    assert set(found) == {f"{k}/decided_by_{t}" for k in values for t in ("end", "warmth")}
    from rlhf_lightning.evaluate.report import _deciding_term_rows

    labels = [label for label, _ in _deciding_term_rows(found)]
    assert labels[0] == "accuracy, 1 pair decided by gold's end term"
    assert "accuracy, 2 pairs decided by gold's warmth term" in labels


def test_expected_accuracy_is_the_mean_over_bradley_terry_draws_of_the_labels():
    """σ(|Δg|/τ) where the judge orders a pair as gold does, 1 − σ where not, ½ on a tie; and the
    accuracy on labels drawn from Bradley–Terry under gold averages to it."""
    from rlhf_lightning.evaluate.rm import expected_accuracy

    rng = np.random.default_rng(0)
    gold_margin = rng.normal(0.0, 1.0, 200)
    tau = 0.3
    ceiling = 1 / (1 + np.exp(-np.abs(gold_margin) / tau))
    assert np.allclose(expected_accuracy(gold_margin, gold_margin, tau), ceiling)
    assert np.allclose(expected_accuracy(-gold_margin, gold_margin, tau), 1 - ceiling)
    assert np.all(expected_accuracy(np.zeros(200), gold_margin, tau) == 0.5)
    judge = gold_margin + rng.normal(0.0, 1.0, 200)  # agrees with gold on some pairs
    p_first = 1 / (1 + np.exp(-gold_margin / tau))  # P(the first response is labelled chosen)
    draws = rng.random((20_000, 200)) < p_first  # [draw, pair]: first response chosen?
    sampled = np.where(draws, judge > 0, judge < 0).mean()
    assert sampled == pytest.approx(expected_accuracy(judge, gold_margin, tau).mean(), abs=2e-3)
