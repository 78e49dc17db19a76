"""Shared-prefix forwards: each prompt runs once per group, and no number changes.

Per pass (log-probs, entropies, values' hidden states, reward scores, and their gradients) on
the checkpoint architectures users bring, the fallbacks (activation checkpointing, prompts that
differ inside a group, a model that fails the probe), and whole runs from the command line with
the switch on and off (weights equal to 1e-5, and moved).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from helpers import TINY, train_cli

from rlhf_lightning.models import shared_prefix as S
from rlhf_lightning.models.factory import ModelSpec, train_without_dropout
from rlhf_lightning.models.heads import position_ids
from rlhf_lightning.models.logprobs import response_logprobs
from rlhf_lightning.models.reward_scores import reward_scores

TOL = 1e-5

CONFIGS = {
    "llama": lambda: T.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
    ),
    "qwen2": lambda: T.Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
    ),
    "gpt2": lambda: T.GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "pythia": lambda: T.GPTNeoXConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        pad_token_id=0,
    ),
    "opt": lambda: T.OPTConfig(
        vocab_size=100,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        pad_token_id=1,
        max_position_embeddings=64,
    ),
}


def _grouped_batch(k=3, groups=2, prompt=6, response=5):
    """Rows g·k … g·k+k−1 answer prompt g; prompt 1 is left-padded, one response ended early."""
    torch.manual_seed(3)
    prompts = torch.randint(3, 100, (groups, prompt))
    prompt_mask = torch.ones(groups, prompt, dtype=torch.long)
    prompt_mask[1, :2] = 0
    ids = torch.cat(
        [prompts.repeat_interleave(k, 0), torch.randint(3, 100, (groups * k, response))], 1
    )
    attention = torch.cat(
        [prompt_mask.repeat_interleave(k, 0), torch.ones(groups * k, response, dtype=torch.long)],
        1,
    )
    attention[1, -2:] = 0
    mask = torch.zeros(ids.shape)
    mask[:, prompt:] = attention[:, prompt:].float()
    return ids, attention, mask, (k, prompt)


def _run(model, ids, attention, mask, shared):
    model.zero_grad()
    out = response_logprobs(
        model,
        ids,
        attention,
        mask,
        position_ids=position_ids(attention),
        entropy=True,
        hidden=True,
        shared_prefix=shared,
    )
    out.logprobs.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shared_prefix_equals_the_plain_pass_in_values_and_gradients(name):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    ids, attention, mask, shared = _grouped_batch()
    plain, plain_grads = _run(model, ids, attention, mask, None)
    ours, our_grads = _run(model, ids, attention, mask, shared)
    assert model._rlhf_shared_prefix_is_exact  # the path was taken
    assert torch.allclose(ours.logprobs, plain.logprobs, atol=TOL, rtol=0)
    assert torch.allclose(ours.entropy, plain.entropy, atol=TOL, rtol=0)
    real = attention[:, shared[1] - 1 :].bool()  # states the value head reads (from Tp − 1)
    width = shared[1] - 1
    assert torch.allclose(ours.hidden[:, width:][real], plain.hidden[:, width:][real], atol=1e-4)
    scale = max(float(g.abs().max()) for g in plain_grads.values())
    for key, grad in plain_grads.items():  # the prompt's gradient, summed over its k responses
        assert float((our_grads[key] - grad).abs().max()) <= TOL * max(scale, 1.0), key


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_reward_scores_of_pairs_sharing_a_prompt_equal_the_plain_pass(name):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config.num_labels = 1
    model = T.AutoModelForSequenceClassification.from_config(config).eval()
    # right-padded pairs as the preference collator makes them: chosen rows, then rejected rows
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    responses = [[20, 21], [22], [23, 24, 25], [26, 27]]
    sequences = [prompts[0] + responses[0], prompts[1] + responses[1]]
    sequences += [prompts[0] + responses[2], prompts[1] + responses[3]]
    width = max(map(len, sequences))
    pad = config.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    attention = (torch.arange(width) < torch.tensor([len(s) for s in sequences])[:, None]).long()
    starts = torch.tensor([3, 5, 3, 5])
    response = attention * (torch.arange(width) >= starts[:, None])
    groups = torch.tensor([[0, 2], [1, 3]])
    scores = {}
    for key, g in (("plain", None), ("shared", groups)):
        model.zero_grad()
        s = reward_scores(model, ids, attention, response, g)
        (s * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        scores[key] = (s.detach(), [p.grad.clone() for p in model.parameters()])
    assert model._rlhf_shared_prefix_is_exact
    assert torch.allclose(scores["plain"][0], scores["shared"][0], atol=TOL, rtol=0)
    for a, b in zip(scores["plain"][1], scores["shared"][1], strict=True):
        assert torch.allclose(a, b, atol=TOL, rtol=0)


def test_activation_checkpointing_falls_back_to_the_plain_pass_in_one_line(capsys):
    model = ModelSpec(gradient_checkpointing=True).trainable(
        T.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    )
    train_without_dropout(model)
    ids, attention, mask, shared = _grouped_batch()
    calls = []
    original = S.shared_prefix_states
    S.shared_prefix_states = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        plain, _ = _run(model, ids, attention, mask, None)
        ours, _ = _run(model, ids, attention, mask, shared)
        with torch.no_grad():  # without a backward the cache survives: shared again
            response_logprobs(model, ids, attention, mask, shared_prefix=shared)
    finally:
        S.shared_prefix_states = original
    assert torch.allclose(ours.logprobs, plain.logprobs, atol=TOL, rtol=0)
    lines = [line for line in capsys.readouterr().out.splitlines() if "[shared-prefix]" in line]
    assert len(lines) == 1 and "activation checkpointing" in lines[0]
    assert len(calls) >= 1  # the no-grad call (and the one-time probe) took the shared path


def test_rows_that_do_not_share_their_prompt_take_the_plain_pass():
    model = T.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()
    ids, attention, mask, shared = _grouped_batch()
    ids[1, 3] = (ids[1, 3] + 1) % 100  # one sample's prompt differs from its group's
    assert not S.can_share(model, ids, shared)
    ours = response_logprobs(model, ids, attention, mask, shared_prefix=shared)
    plain = response_logprobs(model, ids, attention, mask)
    assert torch.equal(ours.logprobs, plain.logprobs)


def test_a_model_that_cannot_take_an_external_cache_is_found_by_the_probe(capsys, monkeypatch):
    model = T.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()

    def no_cache(output):
        raise TypeError("this architecture returns no cache")

    monkeypatch.setattr(S, "cache_of", no_cache)
    ids, attention, mask, shared = _grouped_batch()
    ours = response_logprobs(model, ids, attention, mask, shared_prefix=shared)
    plain = response_logprobs(model, ids, attention, mask)
    assert torch.equal(ours.logprobs, plain.logprobs)
    assert model._rlhf_shared_prefix_is_exact is False
    assert "cannot run a prompt's cache" in capsys.readouterr().out


# ---- whole runs from the command line ----------------------------------------------------------


def _weights(root: Path, stage: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(root / "artifacts" / "reviews" / stage / "model.safetensors")


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


SWITCH = {
    "rloo": [],
    "ppo-micro": ["algo=ppo", "policy.micro_batch_size=8", "policy.forward_batch_size=8"],
    "rloo-two-epochs-micro": ["algo.epochs=2", "policy.micro_batch_size=8"],
}
# The policy takes plain gradient steps here: the run compares the gradients of the two paths.
# Adam divides each gradient by its own running scale, so float32 round-off (~1e-7) of a near-zero
# gradient becomes a full ±lr step: measured 3e-5 apart after 3 Adam steps at lr 1e-3 with the
# same RM, 1.2e-7 after 3 SGD steps at lr 1 that moved the weights by 0.11.
SGD = [
    "~policy.optimizer.betas",
    "policy.optimizer._target_=torch.optim.SGD",
    "policy.optimizer.lr=1.0",
]


SWITCH_KEYS = ["policy.shared_prefix", "rm.shared_prefix", "reward.shared_prefix"]


def _train(stage: list[str], on: str, root: Path, extra: list[str] = ()) -> None:
    out = train_cli(
        [*stage, *TINY, "callbacks=none", *extra, *(f"{k}={on}" for k in SWITCH_KEYS)], root
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[shared-prefix]" not in out.stdout  # no fallback on the tiny Llama


@pytest.fixture(scope="module")
def sft_and_rm(tmp_path_factory) -> dict[str, Path]:
    """The SFT model and reward model trained with the switch on and with it off (the policy
    cases below share them: their settings touch the policy stage only)."""
    roots = {on: tmp_path_factory.mktemp(f"shared_{on}") for on in ("true", "false")}
    for on, root in roots.items():
        _train(["stage=pipeline", "stage.stages=[sft,rm]"], on, root)
    return roots


@pytest.mark.slow
def test_the_reward_model_trained_with_the_switch_on_equals_it_off(sft_and_rm):
    assert _max_diff(_weights(sft_and_rm["false"], "rm"), _weights(sft_and_rm["true"], "rm")) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SWITCH))
def test_runs_with_the_switch_on_equal_runs_with_it_off(case, sft_and_rm, tmp_path):
    """The policy on/off from the SAME sft and RM (the switch-on ones): an RM 6e-8 apart (float32
    sums in another order) would otherwise be compared through a policy stage that amplifies it
    (see SGD)."""
    for on in ("true", "false"):
        shutil.copytree(
            sft_and_rm["true"] / "artifacts", tmp_path / on / "artifacts", symlinks=True
        )
        _train(["stage=policy"], on, tmp_path / on, [*SGD, *SWITCH[case]])
    on, off = tmp_path / "true", tmp_path / "false"
    assert _max_diff(_weights(off, "policy"), _weights(on, "policy")) <= TOL
    assert _max_diff(_weights(on, "policy"), _weights(on, "sft")) > 1e-3


def test_generation_prefills_each_prompt_once_and_draws_the_same_samples():
    from rlhf_lightning.generation import hf as backend
    from rlhf_lightning.generation.keyed import sample_seeds
    from rlhf_lightning.generation.sampling import sample
    from rlhf_lightning.generation.settings import GenerationSettings
    from rlhf_lightning.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(["the plot was great . a dull film , and slow ."] * 20, 300)
    config = CONFIGS["llama"]()
    config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    prompts = ["the plot was", "a dull film , and"]
    settings = GenerationSettings(max_new_tokens=6)
    seeds = sample_seeds(0, 0, [0, 1], 3)
    prefills = []
    original = backend.prefill_once

    def counted(model, prompt_ids, prompt_mask, k):
        out = original(model, prompt_ids, prompt_mask, k)
        prefills.append((len(prompt_ids), k, bool(out)))
        return out

    backend.prefill_once = counted
    try:
        plain = sample(model, tokenizer, prompts, 3, settings, seeds)
        shared = sample(model, tokenizer, prompts, 3, settings, seeds, shared_prefix=True)
    finally:
        backend.prefill_once = original
    assert prefills == [(6, 1, False), (6, 3, True)]  # the second: 2 prompts, expanded to 6 rows
    for a, b in zip(plain, shared, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_the_learned_reward_scores_k_samples_of_a_prompt_with_one_prompt_pass():
    from rlhf_lightning.models.tokenizer import build_tokenizer
    from rlhf_lightning.rewards.learned import LearnedReward

    tokenizer = build_tokenizer(["the plot was great . a dull film , and slow ."] * 20, 300)
    config = CONFIGS["llama"]()
    config.vocab_size, config.pad_token_id, config.num_labels = (
        len(tokenizer),
        tokenizer.pad_token_id,
        1,
    )
    torch.manual_seed(0)
    model = T.AutoModelForSequenceClassification.from_config(config).eval()
    prompts = ["the plot was"] * 3 + ["a dull film , and"] * 3
    responses = ["great .", "slow .", "a dull", "slow", "great . and", "the plot ."]
    scores = {}
    for shared in (False, True):
        reward = LearnedReward(batch_size=4, shared_prefix=shared)  # chunks of whole groups
        reward.model, reward.tokenizer = model, tokenizer
        scores[shared] = reward.raw(prompts, responses, group_size=3)  # the rollout's k
    assert model._rlhf_shared_prefix_is_exact
    assert torch.allclose(scores[True], scores[False], atol=TOL, rtol=0)
