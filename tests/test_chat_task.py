"""`task=chat` and the SmolLM2 recipes: the gold judge by hand, the labels' Bayes ceiling, the
files through the user-data loader, determinism by seed, the sample cache, and each recipe at a
toy size (a few pairs of 8 tokens, a few steps) so none of them rots. The recipes are also SmolLM2's
every stage from the checkpoint as a user runs it: rm → policy (ppo, rloo) and dpo at the precision
the recipes pick on this host, each fast path seen staying on, the artifacts loadable by
transformers, and eval.py on the policy against the reference its manifest names."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import compose, script_cli, train_cli
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_lightning.data.spec import TaskData
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.models.factory import ModelSpec
from rlhf_lightning.tasks import chat_judge as judge
from rlhf_lightning.tasks.base import TASK_FILES, Task
from rlhf_lightning.tasks.chat import ChatTask, _label
from rlhf_lightning.tasks.chat_prompts import all_requests, subject_keyword
from rlhf_lightning.tasks.chat_samples import SampleCache, digest

REQUEST = "In one or two sentences, write an enthusiastic review of a stainless steel water bottle."
GOOD = "This water bottle keeps my drinks cold all day, and I love its simple design."
DEGENERATE = [
    "",  # nothing
    "<|im_end|>",  # only markup
    "bottle bottle bottle bottle bottle bottle bottle",  # repetition
    "This water bottle keeps my drinks cold all day, and I love its simple",  # cut off
    "Great!",  # too short
    "Notwithstanding incomprehensibility, epistemological considerations proliferate "
    "phenomenologically.",  # unreadable
]
TOY_TASK = dict(
    n_pairs_train=4,
    n_pairs_val=2,
    n_pairs_test=2,
    n_prompts_eval=4,
    max_new_tokens=8,
    batch_size=8,
)


def gold(*responses: str, request: str = REQUEST) -> list[float]:
    return ChatTask(None).gold_reward([request] * len(responses), list(responses)).tolist()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def smollm2() -> ModelSpec:
    """SmolLM2-135M-Instruct's spec (converted once into the shared cache)."""
    return instantiate(compose(["model=smollm2"]).model)


@pytest.fixture(scope="module")
def toy_dir(rm_root) -> Path:
    """The task's files at a toy size, as `train.py experiment=smollm2_rm` wrote them."""
    return rm_root / "data/chat"


# ---- the gold judge ------------------------------------------------------------------------------


def test_is_a_task_with_470_distinct_requests():
    assert isinstance(ChatTask(None), Task) and ChatTask.name == "chat"
    requests = [r for r, _ in all_requests()]
    assert len(requests) == len(set(requests)) == 470


def test_a_good_answer_beats_every_degenerate_one():
    good, *bad = gold(GOOD, *DEGENERATE)
    assert good > 1.0 and all(good - b > 0.99 for b in bad), (good, bad)  # by a margin
    assert gold("")[0] == gold("<|im_end|>")[0] == judge.GOLD_MIN


def test_piling_up_positive_words_raises_gold_the_exploit():
    """A lexicon judge is exploitable the way learned reward models are: praise stacked on a good
    answer raises its score though a reader learns nothing more."""
    piled = GOOD + " Amazing, wonderful, fantastic, perfect, best ever!"
    more = piled + " Love love it, brilliant, superb!"
    g_good, g_piled, g_more = gold(GOOD, piled, more)
    assert g_good < g_piled < g_more <= judge.GOLD_MAX


def test_terms_by_hand():
    t = judge.terms("the the the the the")  # trigrams: 3, all the same → 1 − 1/3
    assert t["repetition"] == pytest.approx(2 / 3) and t["no_end"] == 1.0 and t["sentiment"] == 0
    g = judge.score("the the the the the")  # 2·0 − 1 − 3·(2/3) − hard(FRE 117: 0) − short(n=5: 0)
    assert g == pytest.approx(-3.0)
    assert judge.ends_sentence('He said "great!" 🎉') and not judge.ends_sentence("and then")


def test_naming_the_subject_counts_and_the_prompt_gives_it():
    rendered = f"<|im_start|>user\n{REQUEST}<|im_end|>\n<|im_start|>assistant\n"
    assert subject_keyword(rendered) == "bottle" and subject_keyword("anything else") is None
    on, off = gold("I love this bottle.", "I love this thing.", request=rendered)
    assert on - off == pytest.approx(judge.WEIGHTS["mention"], abs=0.05)


def test_gold_is_float32_per_response_and_never_fails_on_odd_text():
    odd = ["", " ", "\n\n", "🎉🎉", "<|im_start|>", "é" * 500, "word " * 300, "1 2 3."]
    g = ChatTask(None).gold_reward(["?"] * len(odd), odd)
    assert g.dtype == torch.float32 and g.shape == (len(odd),)
    assert torch.isfinite(g).all() and (g >= judge.GOLD_MIN).all() and (g <= judge.GOLD_MAX).all()


def test_labels_sample_bradley_terry_and_bayes_is_computed_by_hand():
    pairs = [
        {"pair": 0, "request": REQUEST, "responses": [GOOD, DEGENERATE[3]]},
        {"pair": 1, "request": REQUEST, "responses": [DEGENERATE[2], GOOD]},
        {"pair": 2, "request": REQUEST, "responses": [GOOD, GOOD]},  # identical: left out
        {"pair": 3, "request": REQUEST, "responses": ["  ", GOOD]},  # empty: left out
    ]
    tau = 0.5
    rows, bayes, agreement, left_out = _label(pairs, "0/label/train", tau)
    assert len(rows) == 2 and left_out == 2
    g = [gold(*p["responses"]) for p in pairs[:2]]
    expected = sum(1 / (1 + math.exp(-abs(a - b) / tau)) for a, b in g) / 2
    assert bayes == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= agreement <= 1.0
    assert rows == _label(pairs, "0/label/train", tau)[0]  # each label from its own stream
    assert rows[0]["prompt"] == [{"role": "user", "content": REQUEST}]
    assert rows[0]["chosen"][0]["role"] == "assistant"


def test_eval_requests_are_held_out_and_the_split_follows_the_seed():
    a, b = ChatTask(None, seed=0), ChatTask(None, seed=1)
    assert not set(a.eval_requests) & set(a.train_requests)
    assert len(a.eval_requests) == 64 and len(a.train_requests) == 470 - 64
    assert a.eval_requests == ChatTask(None, seed=0).eval_requests != b.eval_requests


def test_the_runs_seed_leaves_the_chat_tasks_data_alone(tmp_path):
    """`seed=1` re-seeds the run (initialisation, data order, sampling keys), not the task's pairs:
    they take ~30 min to sample and the recipes' reward model is trained on them (a `seed=1`
    eval once set off a resample of all 1,500). The synthetic tasks, generated in seconds, still
    follow the run's seed; `task.seed` picks the chat task's."""
    for recipe in ("smollm2_rm", "smollm2_policy", "smollm2_dpo"):
        cfg = compose([f"experiment={recipe}", "seed=1"], tmp_path)
        assert (cfg.seed, cfg.task.seed) == (1, 0), recipe
    assert compose(["task=chat", "model=smollm2", "task.seed=3"], tmp_path).task.seed == 3
    assert compose(["seed=2"], tmp_path).task.seed == 2  # reviews


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(n_pairs_train=0), "task.n_pairs_train"),
        (dict(n_prompts_eval=470), "task.n_prompts_eval"),
        (dict(temperature=0.0), "task.temperature"),
        (dict(sampling_temperature=-1.0), "task.sampling_temperature"),
        (dict(batch_size=0), "task.batch_size"),
    ],
)
def test_bad_settings_fail_with_one_line_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ChatTask(None, **kwargs)


def test_the_tiny_model_has_no_checkpoint_to_sample_from(tmp_path):
    task = instantiate(compose(["task=chat", "model=tiny"], tmp_path).task)
    with pytest.raises(ConfigError, match="model=smollm2"):
        task.write(tmp_path / "chat")
    with pytest.raises(ConfigError, match="model=smollm2"):
        next(task.corpus())


@pytest.mark.parametrize("recipe", ["smollm2_rm", "smollm2_policy", "smollm2_dpo"])
def test_recipes_pin_the_checkpoint_and_accept_a_users_files(recipe, tmp_path):
    cfg = compose([f"experiment={recipe}"], tmp_path)
    assert cfg.task._target_.endswith("ChatTask") and cfg.model.lora is None
    assert "gguf.converted" in cfg.model.name_or_path._target_
    if recipe != "smollm2_rm":
        stage = "dpo" if recipe == "smollm2_dpo" else "policy"
        assert cfg[stage].reference == "checkpoint"
        generation = cfg.policy.generation  # the reference samples as it sampled the pairs
        assert generation.max_new_tokens == cfg.task.max_new_tokens
        assert generation.temperature == cfg.task.sampling_temperature
    user = compose(
        [f"experiment={recipe}", "data=jsonl", "data.path=p.jsonl", "data.val_path=v.jsonl"]
    )
    assert user.data._target_.endswith("FileData") and user.data.val_path == "v.jsonl"


# ---- sampled from the checkpoint (toy size) -------------------------------------------------------


@pytest.mark.slow
def test_files_read_back_through_the_loader(toy_dir, smollm2):
    assert all((toy_dir / name).exists() for name in TASK_FILES)
    data = TaskData(ChatTask(smollm2, **TOY_TASK), str(toy_dir.parent))  # written: not again
    tokenizer = smollm2.tokenizer(lambda: iter(()), cache_dir=None)
    for kind, split in [("prefs", "train"), ("prefs", "test"), ("sft", "val"), ("prompts", "eval")]:
        records = data.load(kind, split, tokenizer).records
        assert records and records[0].prompt.endswith("<|im_start|>assistant\n")
    pair = data.load("prefs", "train", tokenizer).records[0]
    assert pair.chosen.endswith("<|im_end|>\n") and pair.chosen != pair.rejected
    eval_prompts = {r["prompt"][0]["content"] for r in read_jsonl(toy_dir / "prompts_eval.jsonl")}
    used = {
        r["prompt"][0]["content"]
        for s in ("train", "val", "test")
        for r in read_jsonl(toy_dir / f"prefs_{s}.jsonl")
    }
    assert len(eval_prompts) == 4 and not eval_prompts & used


@pytest.mark.slow
def test_card_bayes_accuracy_matches_the_written_labels(toy_dir):
    card = json.loads((toy_dir / "card.json").read_text())
    tau = card["temperature"]
    assert tau == 0.3 and card["judge"] == {"vaderSentiment": "3.3.2", "textstat": "0.7.8"}
    task = ChatTask(None)
    for split in ("train", "val", "test"):
        rows = read_jsonl(toy_dir / f"prefs_{split}.jsonl")
        requests = [r["prompt"][0]["content"] for r in rows]
        chosen = task.gold_reward(requests, [r["chosen"][0]["content"] for r in rows])
        rejected = task.gold_reward(requests, [r["rejected"][0]["content"] for r in rows])
        bayes = torch.sigmoid((chosen - rejected).abs().double() / tau).mean().item()
        assert card["bayes_accuracy"][split] == pytest.approx(bayes, abs=1e-6)
        assert len(rows) + card["pairs_left_out"][split] == card["settings"][f"n_pairs_{split}"]


def test_another_seed_moves_the_cached_samples_aside_and_switching_back_restores_them(tmp_path):
    """A cache of minutes of sampling is never deleted by a run with other settings (issue 21:
    an `eval.py seed=1` once wiped the seed-0 pairs of data/chat)."""
    directory = tmp_path / "samples"
    a, b = {"seed": 0, "n": 1}, {"seed": 1, "n": 1}
    rows = lambda seed, n: [{"pair": i, "request": f"{seed}:{i}"} for i in range(n)]  # noqa: E731

    assert SampleCache(directory, a).load() == {"train": [], "val": [], "test": []}
    SampleCache.append(directory / "train.jsonl", rows(0, 3))
    SampleCache.append(directory / "val.jsonl", rows(0, 1))
    assert SampleCache(directory, a).load()["train"] == rows(0, 3)  # same key: kept in place

    assert SampleCache(directory, b).load() == {"train": [], "val": [], "test": []}
    assert json.loads((directory / "key.json").read_text()) == b
    aside = directory / digest(a)
    assert json.loads((aside / "key.json").read_text()) == a  # a's samples wait beside
    assert read_jsonl(aside / "train.jsonl") == rows(0, 3)
    SampleCache.append(directory / "train.jsonl", rows(1, 2))

    back = SampleCache(directory, a).load()  # a again: its pairs back, b's aside in turn
    assert back["train"] == rows(0, 3) and back["val"] == rows(0, 1) and back["test"] == []
    assert not aside.exists()  # moved back whole: the side folder is gone
    assert json.loads((directory / "key.json").read_text()) == a
    assert SampleCache(directory, b).load()["train"] == rows(1, 2)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [digest(a), "key.json", "train.jsonl"]
    )

    (directory / "key.json").unlink()  # files with no key say nothing of what they hold
    assert SampleCache(directory, b).load()["train"] == []
    assert SampleCache(directory, a).load()["train"] == rows(0, 3)  # a's, aside, untouched
    assert digest(a) != digest(b) and digest(a) == digest(dict(reversed(list(a.items()))))


@pytest.mark.slow
def test_same_seed_same_files_and_the_cache_samples_only_new_pairs(
    toy_dir, smollm2, tmp_path, capsys
):
    again = ChatTask(smollm2, **TOY_TASK).write(tmp_path / "again")
    for name in TASK_FILES:
        assert (again / name).read_bytes() == (toy_dir / name).read_bytes(), name
    capsys.readouterr()
    more = ChatTask(smollm2, **{**TOY_TASK, "n_pairs_train": 6}).write(again)
    assert "sampled 2/2 pairs" in capsys.readouterr().out  # the 8 cached pairs are reused
    cached = read_jsonl(toy_dir / "samples/train.jsonl")
    assert read_jsonl(more / "samples/train.jsonl")[:4] == cached
    fewer = ChatTask(smollm2, **TOY_TASK).write(
        again
    )  # back to 4: the cache's first 4, no sampling
    assert "sampled" not in capsys.readouterr().out
    assert (fewer / "prefs_train.jsonl").read_bytes() == (
        toy_dir / "prefs_train.jsonl"
    ).read_bytes()


# ---- every recipe at a toy size (subprocesses of train.py) ----------------------------------------

TOY_TASK_CLI = [f"task.{k}={v}" for k, v in TOY_TASK.items()]
TOY_CLI = TOY_TASK_CLI + [
    "policy.generation.max_new_tokens=8",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "checkpoint=null",  # a SmolLM2 stage's last.ckpt is 1.6 GB: CI's disk is not ours to fill
]
TOY_POLICY = [
    "policy.steps=2",
    "policy.prompts_per_step=2",
    "algo.group_size=2",
    "policy.eval_samples=4",
    "callbacks.kl.n_prompts=2",
    "callbacks.overoptimisation.n_prompts=2",
    "callbacks.best_of_n.n_prompts=2",
    "callbacks.best_of_n.n_samples=2",
    "callbacks.samples.n_prompts=1",
    "callbacks.preference_accuracy.n_pairs=2",
]

NO_EXTRAS = ["~callbacks.best_of_n", "~callbacks.samples"]  # the sweep keeps them


@pytest.fixture(scope="module")
def rm_root(tmp_path_factory) -> Iterator[Path]:
    """experiment=smollm2_rm at a toy size: the task's data and artifacts/chat/rm under one root."""
    root = tmp_path_factory.mktemp("smollm2_root")
    proc = train_cli(["experiment=smollm2_rm", "rm.batch_size=2", *TOY_CLI], root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "rm_recipe.out").write_text(proc.stdout + proc.stderr)
    yield root
    shutil.rmtree(root, ignore_errors=True)  # two SmolLM2 artifacts: gone once the module is done


@pytest.mark.slow
def test_rm_recipe_trains_from_the_checkpoint(rm_root):
    assert (rm_root / "data/chat/card.json").exists()
    assert "[shared-prefix]" not in (rm_root / "rm_recipe.out").read_text()  # fast paths on
    rm = AutoModelForSequenceClassification.from_pretrained(rm_root / "artifacts/chat/rm")
    assert rm.config.pad_token_id != rm.config.eos_token_id  # transformers pools at the EOS


def assert_from_the_checkpoint(artifact: Path, output: str, smollm2: ModelSpec) -> None:
    """A policy or DPO artifact of a recipe: every fast path stayed on (no `[shared-prefix]` line,
    30 layers at the host's precision), the checkpoint is its recorded reference, no SFT was made,
    and transformers loads it as a causal LM."""
    assert "[shared-prefix]" not in output
    manifest = json.loads((artifact / "rlhf_artifact.json").read_text())
    assert manifest["reference"] == "checkpoint"
    assert manifest["reference_path"] == smollm2.name_or_path
    assert not (artifact.parent / "sft").exists()
    AutoModelForCausalLM.from_pretrained(artifact)


@pytest.mark.slow
def test_policy_recipe_runs_ppo_from_the_checkpoint_and_eval_py_reads_it(rm_root, smollm2):
    """PPO (value head on the checkpoint) through the recipe; rloo runs in the β sweep below. Then
    eval.py on the policy: against the reference its manifest names, on the task's held-out
    prompts as training rendered them (SmolLM2's own chat template)."""
    toy = [*TOY_POLICY[1:], "policy.steps=1", *NO_EXTRAS]
    proc = train_cli(["experiment=smollm2_policy", "algo=ppo", *TOY_CLI, *toy], rm_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gold_reward=" in proc.stdout
    assert_from_the_checkpoint(
        rm_root / "artifacts/chat/policy", proc.stdout + proc.stderr, smollm2
    )
    evaluation = script_cli(
        "eval.py",
        ["task=chat", "model=smollm2", *TOY_TASK_CLI, "n_prompts=2", "samples_per_prompt=2"]
        + ["generation.max_new_tokens=6", "best_of_n.enabled=false", "logger=none"],
        rm_root,
        timeout=600,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "[shared-prefix]" not in evaluation.stdout + evaluation.stderr
    report = json.loads(next((rm_root / "outputs" / "eval").glob("*/eval.json")).read_text())
    assert report["checkpoints"]["reference"] == smollm2.name_or_path
    assert report["sides"]["reference"]["kl"]["mean"] == 0.0
    samples = (next((rm_root / "outputs" / "eval").glob("*/samples.jsonl"))).read_text()
    for line in samples.splitlines():
        assert json.loads(line)["prompt"].startswith("<|im_start|>system\n"), line


@pytest.mark.slow
def test_dpo_recipe_runs_from_the_checkpoint_on_a_users_files(rm_root, smollm2, tmp_path):
    data = rm_root / "data/chat"  # the task's files, given as the user's own
    proc = train_cli(
        ["experiment=smollm2_dpo", "dpo.batch_size=2", "dpo.eval_samples=4", *TOY_CLI, "data=jsonl"]
        + [f"data.path={data / 'prefs_train.jsonl'}", f"data.val_path={data / 'prefs_val.jsonl'}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_from_the_checkpoint(
        tmp_path / "artifacts/custom/dpo", proc.stdout + proc.stderr, smollm2
    )


@pytest.mark.slow
def test_beta_sweep_recipe_runs_rloo_per_beta_and_writes_the_report(rm_root, tmp_path):
    """experiment=smollm2_beta_sweep is experiment=smollm2_policy (rloo) as a multirun over β; one β
    here (two jobs in one process, and the report over several β, are tests/test_sweep.py's)."""
    sweep = tmp_path / "sweep"
    proc = train_cli(
        ["experiment=smollm2_beta_sweep", "algo.beta=0.05", "policy.steps=1", *TOY_CLI]
        + [*TOY_POLICY[1:], f"hydra.sweep.dir={sweep}"],
        rm_root,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[shared-prefix]" not in proc.stdout + proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 1
    for job in jobs:
        result = json.loads((job / "result.json").read_text())
        assert result["status"] == "completed" and result["algo"] == "rloo"
        assert (job / "artifacts/policy/config.json").exists()
    assert not (rm_root / "artifacts/chat/sft").exists()  # the checkpoint is the reference
    assert (sweep / "report.md").exists() and (sweep / "report.csv").exists()
    assert (sweep / "frontier.png").stat().st_size > 1000  # proxy and gold against KL


def test_contributions_add_up_to_gold_and_name_what_decides_a_pair():
    texts = [GOOD, *DEGENERATE, "", "I love this bottle.", "word " * 300, "Great!"]
    for text in texts:
        parts = judge.contributions(text, "bottle")
        clipped = min(judge.GOLD_MAX, max(judge.GOLD_MIN, sum(parts.values())))
        assert clipped == pytest.approx(judge.score(text, "bottle"), abs=1e-9), text
    assert judge.contributions("")["no_words"] == judge.GOLD_MIN
    cut, ended = judge.contributions("I love it and"), judge.contributions("I love it.")
    assert cut["no_end"] == -judge.WEIGHTS["no_end"] and ended["no_end"] == 0.0
    terms = ChatTask(None).gold_terms(["?", "?"], ["I love it and", "I love it."])
    assert set(terms) == set(cut) and all(len(v) == 2 for v in terms.values())
