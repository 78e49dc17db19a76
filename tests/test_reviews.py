"""The `reviews` task: files, determinism, gold reward, label ceilings and tokenizer coverage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.models.tokenizer import build_tokenizer
from rlhf_lightning.tasks import reviews_grammar as grammar
from rlhf_lightning.tasks.base import TASK_FILES, Task
from rlhf_lightning.tasks.reviews import ReviewsTask

SMALL = dict(n_sft=40, n_pairs_train=30, n_pairs_val=20, n_pairs_test=20)
SMALL.update(n_prompts_train=25, n_prompts_eval=8)
POSITIVE = " the movie was great ."
DEGENERATE = [
    " great great great great .",
    " the movie was great great great good good good .",
    " . . . but and . .",
    " the movie was great",
    " " + " ".join(f"the {noun} was very great ." for noun in grammar.NOUNS + grammar.NOUNS[:2]),
    "",
]
A = grammar.SATURATION
WORDS = [*grammar.RESPONSE_WORDS, "", " ", "\n", "é", "!"]  # grammar words and odd bits to fuzz
FUZZ = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(WORDS), max_size=60).map(" ".join))


def gold(*responses: str) -> list[float]:
    return ReviewsTask(**SMALL).gold_reward([""] * len(responses), list(responses)).tolist()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory) -> Path:
    """The task at its default sizes, written once for the module."""
    return ReviewsTask().write(tmp_path_factory.mktemp("reviews_default"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ReviewsTask(**SMALL).corpus())


def test_is_a_task():
    assert isinstance(ReviewsTask(**SMALL), Task)
    assert ReviewsTask.name == "reviews"


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a = ReviewsTask(seed=3, **SMALL).write(tmp_path / "a")
    b = ReviewsTask(seed=3, **SMALL).write(tmp_path / "b")
    c = ReviewsTask(seed=4, **SMALL).write(tmp_path / "c")
    for name in TASK_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "prefs_train.jsonl").read_bytes() != (c / "prefs_train.jsonl").read_bytes()
    assert (a / "sft_train.jsonl").read_bytes() != (c / "sft_train.jsonl").read_bytes()


def test_write_is_idempotent_and_rewrites_on_new_settings(tmp_path):
    ReviewsTask(**SMALL).write(tmp_path)
    stamps = {name: (tmp_path / name).stat().st_mtime_ns for name in TASK_FILES}
    ReviewsTask(**SMALL).write(tmp_path)
    assert stamps == {name: (tmp_path / name).stat().st_mtime_ns for name in TASK_FILES}
    ReviewsTask(**{**SMALL, "n_pairs_val": 7}).write(tmp_path)
    assert len(read_jsonl(tmp_path / "prefs_val.jsonl")) == 7


def test_files_have_the_right_keys_and_sizes(tmp_path):
    task = ReviewsTask(**SMALL)
    task.write(tmp_path)
    keys = {"sft": {"prompt", "completion"}, "prefs": {"prompt", "chosen", "rejected"}}
    expected = {
        "sft_train.jsonl": 36,
        "sft_val.jsonl": 4,
        "prefs_train.jsonl": 30,
        "prefs_val.jsonl": 20,
        "prefs_test.jsonl": 20,
        "prompts_train.jsonl": 25,
        "prompts_eval.jsonl": 8,
    }
    for name, size in expected.items():
        rows = read_jsonl(tmp_path / name)
        assert len(rows) == size, name
        assert all(set(row) == keys.get(name.split("_")[0], {"prompt"}) for row in rows), name
    card = json.loads((tmp_path / "card.json").read_text())
    assert card == task.card()
    assert card["task"] == "reviews" and card["sizes"] == expected
    expected_settings = {"seed": 0, "temperature": 0.5, "perturb_fraction": 0.15, **SMALL}
    assert card["settings"] == {**expected_settings, "context_tokens": 0}


def test_responses_start_with_a_space_and_detokenise(tmp_path, tokenizer):
    ReviewsTask(**SMALL).write(tmp_path)
    pairs = read_jsonl(tmp_path / "prefs_train.jsonl")
    sft = read_jsonl(tmp_path / "sft_train.jsonl")
    texts = [(r["prompt"], r["completion"]) for r in sft]
    texts += [(r["prompt"], r[k]) for r in pairs for k in ("chosen", "rejected")]
    assert all(r["chosen"] != r["rejected"] for r in pairs)
    for prompt, response in texts:
        assert response.startswith(" ") and not prompt.endswith(" ")
        ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == prompt + response
    assert all(grammar.is_grammatical(r["completion"]) for r in sft)


def test_eval_prompts_are_held_out_and_prompts_vary(tmp_path):
    ReviewsTask(**SMALL).write(tmp_path)
    eval_prompts = {r["prompt"] for r in read_jsonl(tmp_path / "prompts_eval.jsonl")}
    assert len(eval_prompts) == 8
    for name in TASK_FILES[:-2]:
        assert not eval_prompts & {r["prompt"] for r in read_jsonl(tmp_path / name)}, name
    assert len(set(grammar.all_prompts())) >= 500


def test_degenerate_texts_score_below_an_ordinary_positive_review():
    positive, *bad = gold(POSITIVE, *DEGENERATE)
    assert positive == pytest.approx(A * math.tanh(2 / A))
    assert all(b < positive - 1 for b in bad), bad


def test_gold_matches_hand_computed_values():
    two = (1.5 * 2 + 1) / math.sqrt(2)  # "very great and good"
    three = 0.3 * 1 + 0.7 * -2  # "good but awful"
    got = gold(
        " the plot was very great and good .",
        " the plot was good but awful .",
        " the plot was great . the cast was good .",
        " the movie was great",
        " the movie was great . the movie was good .",
        " the was movie great .",
        "  the movie was great .",
    )
    want = [
        A * math.tanh(two / A),
        A * math.tanh(three / A),
        A * math.tanh(3 / math.sqrt(2) / A),
        A * math.tanh(2 / A) - 1.5,  # no final "."
        A * math.tanh(3 / math.sqrt(2) / A) - 2 * 0.25,  # bigrams "the movie", "movie was"
        -1.5,  # broken sentence
        A * math.tanh(2 / A) - 0.5,  # irregular spacing
    ]
    assert got == pytest.approx(want, abs=1e-6)


def test_stronger_sentiment_scores_higher_among_grammatical_texts():
    ladder = ["awful", "bad", "somewhat bad", "okay", "fine", "good", "great", "very great"]
    scores = gold(*(f" the movie was {words} ." for words in ladder))
    assert scores == sorted(scores) and len(set(scores)) == len(scores)
    one, two, three, four = gold(
        " the movie was great .",
        " the movie was great . the plot was superb .",
        " the movie was great . the plot was superb . the cast was brilliant .",
        " the movie was great . the plot was superb . the cast was brilliant . its ending is fun .",
    )
    assert one < two < three and four < three  # more praise helps, up to three sentences


@settings(max_examples=300, deadline=None)
@given(FUZZ)
def test_gold_never_raises_and_stays_in_range(text):
    value = ReviewsTask(**SMALL).gold_reward(["p"], [text])
    assert value.shape == (1,) and value.dtype == torch.float32
    assert grammar.GOLD_MIN <= value.item() <= grammar.GOLD_MAX


def test_gold_reward_is_a_float32_batch_and_checks_lengths():
    task = ReviewsTask(**SMALL)
    assert task.gold_reward(["a", "b"], [POSITIVE, ""]).shape == (2,)
    with pytest.raises(ValueError):
        task.gold_reward(["a"], [POSITIVE, POSITIVE])


def _recompute(data_dir: Path, split: str, tau: float) -> tuple[float, float]:
    """Bayes accuracy mean σ(|Δg|/τ) and label agreement, from the written file."""
    rows = read_jsonl(data_dir / f"prefs_{split}.jsonl")
    task = ReviewsTask(**SMALL)
    chosen = task.gold_reward([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = task.gold_reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    delta = (chosen - rejected).double()
    bayes = torch.sigmoid(delta.abs() / tau).mean().item()
    agreement = ((delta > 0).double() + 0.5 * (delta == 0).double()).mean().item()
    return bayes, agreement


def test_card_ceilings_match_a_recomputation_at_default_sizes(default_dir):
    card = json.loads((default_dir / "card.json").read_text())
    for split in ("train", "val", "test"):
        bayes, agreement = _recompute(default_dir, split, card["temperature"])
        assert card["bayes_accuracy"][split] == pytest.approx(bayes, abs=1e-5)
        assert card["label_gold_agreement"][split] == pytest.approx(agreement, abs=1e-5)
        assert abs(agreement - bayes) < 0.03
        assert 0.84 < bayes < 0.90


def test_default_data_mixes_sentiment_and_some_perturbed_text(default_dir):
    card = json.loads((default_dir / "card.json").read_text())
    assert -0.5 < card["gold_stats"]["mean"] < 0.5 and 0.8 < card["gold_stats"]["std"] < 1.5
    rows = read_jsonl(default_dir / "prefs_train.jsonl")
    responses = [r[k] for r in rows for k in ("chosen", "rejected")]
    broken = sum(not grammar.is_grammatical(r) for r in responses) / len(responses)
    assert 0.10 < broken < 0.17  # perturb_fraction = 0.15, a few perturbations are no-ops


def test_no_perturbation_gives_only_grammatical_pairs(tmp_path):
    ReviewsTask(**{**SMALL, "perturb_fraction": 0.0}).write(tmp_path)
    rows = read_jsonl(tmp_path / "prefs_train.jsonl")
    assert all(grammar.is_grammatical(r[k]) for r in rows for k in ("chosen", "rejected"))


def test_every_task_word_is_one_token_with_its_leading_space(tokenizer):
    prompt_words = {w for p in grammar.all_prompts() for w in p.split()[1:]}
    for word in {*grammar.RESPONSE_WORDS, *prompt_words}:
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    for template in grammar.PROMPT_TEMPLATES:
        first = template.split()[0]  # a prompt's first word has no leading space
        assert len(tokenizer(first, add_special_tokens=False)["input_ids"]) == 1, first


@pytest.mark.parametrize(
    "bad",
    [{"n_sft": 1}, {"n_pairs_val": 0}, {"n_prompts_eval": 10_000}, {"temperature": 0.0},
     {"perturb_fraction": 1.5}],
)  # fmt: skip
def test_impossible_settings_raise_config_error(bad):
    with pytest.raises(ConfigError):
        ReviewsTask(**{**SMALL, **bad})


def test_context_tokens_put_a_fixed_long_context_before_every_prompt():
    from rlhf_lightning.tasks.reviews import ReviewsTask

    small = dict(n_sft=8, n_pairs_train=8, n_pairs_val=4, n_pairs_test=4, n_prompts_train=8)
    plain = ReviewsTask(**small, n_prompts_eval=2)._generate()
    long = ReviewsTask(**small, n_prompts_eval=2, context_tokens=64)._generate()
    for file_name in ("prefs_train.jsonl", "sft_train.jsonl", "prompts_train.jsonl"):
        for a, b in zip(plain[file_name], long[file_name], strict=True):
            assert b["prompt"].endswith(" " + a["prompt"])  # the same prompt, after its context
            assert len(b["prompt"].split()) == 64 + len(a["prompt"].split())
    contexts = {r["prompt"] for r in long["prefs_train.jsonl"]}
    by_prompt = {r["prompt"].split(" review of")[0] for r in long["prefs_train.jsonl"]}
    assert len(by_prompt) <= len(contexts)  # one context per prompt, whichever file it is in
    assert long["card.json"]["bayes_accuracy"] == plain["card.json"]["bayes_accuracy"]
