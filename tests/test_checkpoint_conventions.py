"""What real checkpoints bring, and that it never changes what we sample or what the RM scores.

- A checkpoint's `generation_config.json` (repetition_penalty, top_k, top_p, temperature, min_p,
  suppress_tokens, no_repeat_ngram_size, do_sample) leaves samples unchanged: they come from
  softmax(z/T) only, the distribution the log-probs score (issue 20, defect 2).
- The policy and the reward model cut a long prompt by one rule; the RM scores at the
  max_length its manifest records (defect 3).
- A response cut at `max_new_tokens` reaches the RM without an EOS (defect 4).

Checkpoints are the offline layouts of `layouts.py`, including SmolLM2's pad == eos one.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from layouts import PAD_IS_EOS, save_checkpoint, with_generation_config
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers import LlamaForSequenceClassification as Classifier

from rlhf_lightning.artifacts import read_manifest
from rlhf_lightning.data.batching import truncate
from rlhf_lightning.data.encoding import encode_prompt, encode_prompts, fit_prompts, layout
from rlhf_lightning.generation.sampling import policy_prompts, sample
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.models.reward_scores import reward_scores
from rlhf_lightning.models.tokenizer import build_tokenizer
from rlhf_lightning.modules.evaluation import sample_and_score
from rlhf_lightning.rewards.ensemble import EnsembleReward
from rlhf_lightning.rewards.learned import LearnedReward

TEXTS = [
    "the plot was great and the acting was fine .",
    "a dull film , slow and long , with a weak ending .",
    "review of the silent harbor : a calm and lovely story .",
] * 20
PROMPTS = ["review of the silent harbor :", "the plot was", "a dull film ,"]
SHIPPED = dict(  # what Hub checkpoints put in generation_config.json (Qwen2.5-Instruct: several)
    do_sample=True,
    repetition_penalty=1.8,
    top_k=3,
    top_p=0.5,
    temperature=0.3,
    min_p=0.3,
    suppress_tokens=list(range(3, 200)),
    no_repeat_ngram_size=2,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple]:
    """layout -> (the checkpoint, its copy whose generation_config.json sets `SHIPPED`)."""
    out = {}
    for name in (PAD_IS_EOS, "qwen2"):
        plain = save_checkpoint(name, TEXTS, tmp_path_factory.mktemp(name) / "plain")
        out[name] = plain, with_generation_config(plain, plain.parent / "shipped", **SHIPPED)
    return out


# ---- defect 2: the checkpoint's sampling settings are not ours ------------------------------------


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "global_rng"])
@pytest.mark.parametrize("name", [PAD_IS_EOS, "qwen2"])
def test_a_checkpoints_sampling_settings_change_no_sample(name, keyed, folders):
    plain, shipped = folders[name]
    tokenizer = AutoTokenizer.from_pretrained(plain)
    settings = GenerationSettings(max_new_tokens=12, temperature=0.7)
    seeds = list(range(100, 100 + 2 * len(PROMPTS))) if keyed else None
    draws = []
    for folder in (plain, shipped):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        torch.manual_seed(0)  # the global RNG path draws from it; keyed sampling does not
        draws.append(sample(model, tokenizer, PROMPTS, 2, settings, seeds))
        if folder == shipped:  # the settings were read, and are still the model's after
            assert model.generation_config.top_k == 3
            assert model.generation_config.repetition_penalty == 1.8
    (ids, _, mask, ended, _), (ids2, _, mask2, ended2, _) = draws
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2) and torch.equal(ended, ended2)
    assert int(mask.sum()) > len(ids)  # something was sampled


# ---- defect 4: a response cut at max_new_tokens is scored unfinished ------------------------------


def tiny(tokenizer) -> tuple:
    """(causal LM, sequence classifier) of the tiny Llama shape for `tokenizer`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), Classifier(config).eval()


def tokenizers(folders) -> dict:
    return {
        "tiny": build_tokenizer(TEXTS, vocab_size=300),
        PAD_IS_EOS: AutoTokenizer.from_pretrained(folders[PAD_IS_EOS][0]),
    }


def scored(reward_model, tokenizer, prompt: str, response: str, eos: bool) -> float:
    """The RM's score of `encode_prompt(prompt) + response's own ids (+ EOS)`, one row."""
    ids = (
        encode_prompt(tokenizer, prompt)
        + tokenizer(response, add_special_tokens=False)["input_ids"]
    )
    ids = torch.tensor([ids + [tokenizer.eos_token_id] * eos])
    with torch.no_grad():
        return float(reward_scores(reward_model, ids, torch.ones_like(ids)))


@pytest.mark.parametrize("name", ["tiny", PAD_IS_EOS])
def test_a_response_cut_at_max_new_tokens_is_scored_without_eos(name, folders):
    tokenizer = tokenizers(folders)[name]
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == (name == PAD_IS_EOS)
    policy, reward_model = tiny(tokenizer)
    reward = LearnedReward(normalise=False, shared_prefix=False)
    reward.model, reward.tokenizer = reward_model, tokenizer
    module = SimpleNamespace(
        generation=GenerationSettings(max_new_tokens=3),
        tokenizer=tokenizer,
        reference=policy,
        reward=reward,
        shared_prefix=False,
    )
    prompts = PROMPTS * 4
    seeds = list(range(len(prompts)))
    out = sample_and_score(module, policy, prompts, seeds=seeds)
    assert not out["ended"].all()  # some responses were cut at 3 tokens
    for i, (prompt, response) in enumerate(zip(out["prompts"], out["responses"], strict=True)):
        eos = bool(out["ended"][i])
        expected = scored(reward_model, tokenizer, prompt, response, eos)
        assert float(out["proxy"][i]) == pytest.approx(expected, abs=1e-5)
        ids = reward.encode([prompt], [response], [eos])[0]
        assert (ids[-1] == tokenizer.eos_token_id) == eos


def test_ensembles_hand_ended_to_their_members(folders):
    tokenizer = tokenizers(folders)["tiny"]
    _, reward_model = tiny(tokenizer)
    member = LearnedReward(normalise=False)
    member.model, member.tokenizer = reward_model, tokenizer
    ensemble = EnsembleReward({"a": member, "b": lambda p, r: torch.zeros(len(p))})
    prompts, responses, ended = PROMPTS, ["great", "was fine", "slow"], [False, True, False]
    expected = 0.5 * member(prompts, responses, ended=ended)
    torch.testing.assert_close(ensemble(prompts, responses, ended=ended), expected)
    assert not torch.equal(expected, 0.5 * member(prompts, responses))  # EOS changes the score


# ---- defect 3: one truncation rule, the RM's max_length from its manifest -------------------------


def test_a_long_prompt_is_cut_by_the_rms_rule_and_the_reward_scores_the_cut_text(folders):
    tokenizer = tokenizers(folders)["tiny"]
    long = " ".join(TEXTS[:6])
    settings = GenerationSettings(max_new_tokens=4, max_prompt_length=12)
    fitted = policy_prompts(tokenizer, [long, "the plot was"], settings)
    assert fitted[1] == "the plot was"  # fits: unchanged
    ids = encode_prompt(tokenizer, fitted[0])
    assert len(ids) <= 12 and long.endswith(fitted[0].strip())  # the words nearest the response
    lay, full = layout(tokenizer), encode_prompt(tokenizer, long)
    ruled, _ = truncate(full, [], 12, lay.stops, head=len(lay.prefix))
    assert ids == ruled  # the same ids as the RM's rule keeps at 12 tokens
    # the reward model, at a max_length that fits the cut prompt and a response, cuts nothing more
    _, reward_model = tiny(tokenizer)
    reward = LearnedReward(max_length=12 + 4 + 1)
    reward.model, reward.tokenizer = reward_model, tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "[reward] … cut" line
        encoded = reward.encode([fitted[0]], ["great ."])[0]
    assert encoded[: len(ids)] == ids


def test_the_reward_says_when_it_cuts_what_the_policy_saw(folders):
    tokenizer = tokenizers(folders)["tiny"]
    _, reward_model = tiny(tokenizer)
    reward = LearnedReward(max_length=8)
    reward.model, reward.tokenizer = reward_model, tokenizer
    long = " ".join(TEXTS[:3])
    with pytest.warns(UserWarning, match=r"longer than the reward model's max_length=8"):
        reward.raw([long], ["great ."])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reward.raw([long], ["great ."])  # said once


def test_fit_prompts_leaves_prompts_alone_without_a_budget(folders):
    tokenizer = tokenizers(folders)[PAD_IS_EOS]
    long = " ".join(TEXTS[:6])
    assert fit_prompts(tokenizer, [long], None) == ([long], 0)
    (cut,), n = fit_prompts(tokenizer, [long], 10)
    assert n == 1 and len(encode_prompts(tokenizer, [cut])[0]) <= 10


def test_the_rm_artifact_records_its_max_length_and_the_reward_scores_at_it(tmp_path):
    from helpers import TINY, compose

    from rlhf_lightning.context import RunContext
    from rlhf_lightning.run import run

    cfg = compose(["stage=rm", *TINY, "rm.max_length=48", "callbacks=none"], tmp_path)
    run(cfg)
    ctx = RunContext(cfg)
    path = ctx.artifact("rm")
    assert read_manifest(path)["max_length"] == 48
    assert LearnedReward(path=str(path)).setup(ctx).max_length == 48
    with pytest.warns(UserWarning, match=r"max_length=256 ignored.*trained at max_length=48"):
        overruled = LearnedReward(path=str(path), max_length=256).setup(ctx)
    assert overruled.max_length == 48
