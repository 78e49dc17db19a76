"""The enumerable `oracle` task: responses, tokenisation, gold table, standardisation, files."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_lightning.data.encoding import encode_response
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.models.tokenizer import build_tokenizer
from rlhf_lightning.tasks.base import TASK_FILES, Task
from rlhf_lightning.tasks.oracle import OracleTask

SMALL = dict(n_sft=400, n_sft_val=40, n_pairs_train=400, n_pairs_val=100, n_pairs_test=100)


@pytest.fixture(scope="module")
def task():
    return OracleTask(seed=0, **SMALL)


@pytest.fixture(scope="module")
def tokenizer(task):
    return build_tokenizer(task.corpus())


def _mean_std(table, logprobs):
    probs = logprobs.softmax(-1)
    mean = (probs * table).sum(-1)
    return mean, (probs * (table - mean[:, None]) ** 2).sum(-1).sqrt()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_words=8, length=2),  # 64 responses but length < 3
        dict(n_words=3, length=3),  # 27 responses
        dict(words=["red", "red", "blue", "gold"]),
        dict(words=["red", "two words", "blue", "gold"]),
        dict(words=["red", "green", "blue", "gold"], n_words=3),
        dict(n_words=99),
        dict(temperature=0.0),
        dict(n_pairs_train=0),
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ConfigError):
        OracleTask(**kwargs)


def test_response_space(task):
    texts = task.response_texts()
    assert isinstance(task, Task) and task.name == "oracle"
    assert len(texts) == 64 == len(set(texts))
    assert texts[0] == " red red red" and texts[-1] == " gold gold gold"
    assert texts[1 * 16 + 2 * 4 + 3] == " green blue gold"  # lexicographic over word indices
    assert task.prompts() == [f"oracle prompt {i} :" for i in range(4)]
    assert len(OracleTask(n_words=5, length=4).response_texts()) == 625


def test_token_ids_follow_the_encoding_convention(task, tokenizer):
    ids = task.response_token_ids(tokenizer)  # [N, L]
    assert ids.shape == (64, 3) and ids.dtype == torch.long
    for j, text in enumerate(task.response_texts()):
        assert ids[j].tolist() == encode_response(tokenizer, text, eos=False)
    allowed = task.allowed_token_ids(tokenizer)
    assert sorted(tokenizer.decode([i]) for i in allowed) == [" blue", " gold", " green", " red"]
    assert task.generation_kwargs(tokenizer) == {"min_new_tokens": 3, "max_new_tokens": 3}


def test_multi_token_words_are_refused(task):
    foreign = build_tokenizer(["hello world"] * 50)
    with pytest.raises(ConfigError, match="exactly one"):
        task.response_token_ids(foreign)


def test_raw_table_is_standardised_under_base_and_not_additive(task):
    raw = task.raw_rewards()
    assert raw.shape == (4, 64)
    mean, std = _mean_std(raw.double(), task.base_logprobs().double())
    torch.testing.assert_close(mean, torch.zeros(4, dtype=torch.double), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(4, dtype=torch.double), atol=1e-5, rtol=0)
    # a per-position additive model leaves a clear residual: the pairwise term matters
    words = [text.split() for text in task.response_texts()]
    one_hot = torch.tensor(
        [[float(ws[i] == w) for i in range(3) for w in task.words] for ws in words]
    )  # [N, 12]
    fit = torch.linalg.lstsq(one_hot.double(), raw.T.double()).solution
    residual = raw.T.double() - one_hot.double() @ fit
    assert (residual.var(0) / raw.T.double().var(0) > 0.05).all()
    assert not torch.equal(raw, OracleTask(seed=1).raw_rewards())
    torch.testing.assert_close(raw, OracleTask(seed=0).raw_rewards(), rtol=0, atol=0)


def test_base_distribution_is_non_uniform(task):
    base = task.base_logprobs()
    torch.testing.assert_close(base.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)
    assert (0.5 * (base.exp() - 1 / 64).abs().sum(-1) > 0.1).all()


def test_standardise_under_reference():
    task = OracleTask(seed=3, **SMALL)
    ref = (1.5 * torch.randn(4, 64, generator=torch.Generator().manual_seed(0))).log_softmax(-1)
    raw = task.raw_rewards()
    assert torch.equal(task.rewards(), raw)
    task.standardise(ref)
    mean, std = _mean_std(task.rewards().double(), ref.double())
    torch.testing.assert_close(mean, torch.zeros(4, dtype=torch.double), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(4, dtype=torch.double), atol=1e-5, rtol=0)
    assert torch.equal(task.raw_rewards(), raw)
    # an affine map per prompt: order within each row is kept
    assert torch.equal(task.rewards().argsort(-1), raw.argsort(-1))
    with pytest.raises(ValueError):
        task.standardise(ref[:, :10])


def test_gold_reward_lookup_and_fallback():
    task = OracleTask(seed=0, **SMALL)
    task.standardise(task.base_logprobs() * 0.5)
    table, prompts, texts = task.rewards(), task.prompts(), task.response_texts()
    got = task.gold_reward([prompts[2], prompts[0]], [texts[5], texts[63]])
    assert got.dtype == torch.float32 and got.shape == (2,)
    torch.testing.assert_close(got, torch.stack([table[2, 5], table[0, 63]]))
    odd = task.gold_reward(
        [prompts[0], "no such prompt", prompts[1], prompts[1]],
        [" red red", texts[0], "red red red", " red red red </s>"],
    )
    torch.testing.assert_close(odd, torch.full((4,), table.min().item() - 1.0))


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_written_files(tmp_path, task):
    first, second = tmp_path / "a", tmp_path / "b"
    task.write(first)
    OracleTask(seed=0, **SMALL).write(second)
    for name in TASK_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    before = (first / "sft_train.jsonl").stat().st_mtime_ns
    task.write(first)  # idempotent: same settings, nothing rewritten
    assert (first / "sft_train.jsonl").stat().st_mtime_ns == before
    other = OracleTask(seed=1, **SMALL).write(tmp_path / "c")
    assert (other / "prefs_train.jsonl").read_bytes() != (first / "prefs_train.jsonl").read_bytes()

    sft = _read(first / "sft_train.jsonl")
    assert len(sft) == 400 and set(sft[0]) == {"prompt", "completion"}
    assert len(_read(first / "prompts_eval.jsonl")) == 4 * task.prompt_repeats
    card = json.loads((first / "card.json").read_text())
    assert card["settings"] == task.settings() and card["n_responses"] == 64
    for name, rows in card["sizes"].items():
        assert len(_read(first / name)) == rows, name


def test_sft_rows_follow_the_base_distribution(tmp_path, task):
    sft = _read(task.write(tmp_path) / "sft_train.jsonl")
    base = task.base_logprobs().exp().view(4, 4, 16).sum(-1)  # first word's marginal, [P, W]
    for p, prompt in enumerate(task.prompts()):
        first = [row["completion"].split()[0] for row in sft if row["prompt"] == prompt]
        freq = torch.tensor([first.count(w) / len(first) for w in task.words])
        assert 0.5 * (freq - base[p]).abs().sum() < 0.12


def test_preference_labels_and_bayes_accuracy(tmp_path, task):
    data = task.write(tmp_path)
    card = json.loads((data / "card.json").read_text())
    tau = card["temperature"]
    for split, n in (("train", 400), ("val", 100), ("test", 100)):
        rows = _read(data / f"prefs_{split}.jsonl")
        assert len(rows) == n and all(r["chosen"] != r["rejected"] for r in rows)
        prompts = [r["prompt"] for r in rows]
        chosen = task.gold_reward(prompts, [r["chosen"] for r in rows])  # raw: never standardised
        rejected = task.gold_reward(prompts, [r["rejected"] for r in rows])
        bayes = torch.sigmoid((chosen - rejected).abs() / tau).mean().item()
        assert card["bayes_accuracy"][split] == pytest.approx(bayes, abs=1e-5)
        assert 0.6 < bayes < 0.99
        if split == "train":  # labels agree with gold about as often as the Bayes ceiling says
            agree = (chosen > rejected).float().mean().item()
            assert card["label_gold_agreement"]["train"] == pytest.approx(agree)
            assert agree == pytest.approx(bayes, abs=0.06)
