"""Closed-form optimum p* ∝ p_ref exp(r/β) on tables, and exact enumeration with a tiny Llama."""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_lightning.analysis.optimum import (
    closure,
    enumerated_logprobs,
    expected_reward,
    kl_divergence,
    log_partition,
    objective,
    optimal_frontier,
    optimal_logprobs,
    optimal_objective,
)
from rlhf_lightning.data.encoding import encode_prompt
from rlhf_lightning.generation.processors import AllowedTokensLogitsProcessor
from rlhf_lightning.models.tokenizer import build_tokenizer
from rlhf_lightning.tasks.oracle import OracleTask

HALF = torch.log(torch.tensor([[0.5, 0.5]]))  # p_ref, one prompt, two responses
LN2, LN3 = math.log(2), math.log(3)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_two_response_optimum_by_hand(beta):
    # r = β [0, ln 3]: Z = (1 + 3)/2 = 2, p* = [1/4, 3/4], J* = β ln 2
    rewards = beta * torch.tensor([[0.0, LN3]])
    star = optimal_logprobs(HALF, rewards, beta)
    torch.testing.assert_close(star.exp(), torch.tensor([[0.25, 0.75]]))
    assert log_partition(HALF, rewards, beta).item() == pytest.approx(LN2)
    assert optimal_objective(HALF, rewards, beta).item() == pytest.approx(beta * LN2)
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert kl_divergence(star, HALF).item() == pytest.approx(kl)
    assert expected_reward(star, rewards).item() == pytest.approx(0.75 * beta * LN3)
    assert objective(star, HALF, rewards, beta).item() == pytest.approx(beta * LN2)
    assert objective(HALF, HALF, rewards, beta).item() == pytest.approx(0.5 * beta * LN3)


def test_kl_handles_zero_probabilities():
    p = torch.log(torch.tensor([[1.0, 0.0]])).requires_grad_()  # log 0 = −inf
    kl = kl_divergence(p, HALF)
    assert kl.item() == pytest.approx(LN2)
    kl.sum().backward()
    assert torch.isfinite(p.grad).all()


def _table(seed: int, prompts: int, responses: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ref = (2 * torch.randn(prompts, responses, generator=g)).log_softmax(-1)
    policy = (2 * torch.randn(prompts, responses, generator=g)).log_softmax(-1)
    return ref, policy, torch.randn(prompts, responses, generator=g)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    responses=st.integers(2, 20),
    beta=st.floats(0.05, 10.0),
)
def test_no_policy_beats_the_optimum(seed, responses, beta):
    ref, policy, rewards = _table(seed, 3, responses)
    j_star = optimal_objective(ref, rewards, beta)
    star = optimal_logprobs(ref, rewards, beta)
    j = objective(policy, ref, rewards, beta)
    assert j <= j_star + 1e-5
    # J(p) = J* − β mean KL(p ‖ p*): the gap is exactly the KL to the optimum
    gap = beta * kl_divergence(policy, star).mean()
    assert (j_star - j).item() == pytest.approx(gap.item(), rel=1e-3, abs=1e-4)
    assert objective(star, ref, rewards, beta).item() == pytest.approx(j_star.item(), abs=1e-4)


def test_optimum_is_a_stationary_point_of_the_objective():
    ref, _, rewards = _table(0, 2, 7)
    logits = optimal_logprobs(ref, rewards, 0.5).clone().requires_grad_()
    objective(logits.log_softmax(-1), ref, rewards, 0.5).backward()
    assert logits.grad.abs().max().item() < 1e-5


def test_frontier_kl_and_reward_fall_as_beta_grows():
    ref, _, rewards = _table(1, 4, 16)
    betas = [0.1, 0.3, 1.0, 3.0, 10.0, 1000.0]
    frontier = optimal_frontier(ref, rewards, betas)
    kls, gains = [p["kl"] for p in frontier], [p["reward"] for p in frontier]
    assert all(a > b for a, b in zip(kls, kls[1:]))
    assert all(a > b for a, b in zip(gains, gains[1:]))
    assert kls[-1] < 1e-4  # β → ∞: p* → p_ref
    for point in frontier:
        j = point["reward"] - point["beta"] * point["kl"]
        assert point["objective"] == pytest.approx(j, rel=1e-4, abs=1e-4)


def test_closure():
    assert closure(0.0, 0.5, 1.0) == pytest.approx(0.5)
    assert closure(1.0, 3.0, 5.0) == pytest.approx(0.5)
    assert closure(-2.0, -2.0, 0.0) == 0.0


# -- exact enumeration on a tiny Llama ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    task = OracleTask(seed=0)
    tokenizer = build_tokenizer(task.corpus())
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return task, tokenizer, LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def ascended(tiny):
    """Adam on −J(enumerated log-probs), β = 1, from the initial model as p_ref."""
    task, tokenizer, model = tiny
    with torch.no_grad():
        ref = enumerated_logprobs(model, tokenizer, task)  # [P, N]
    task.standardise(ref)
    rewards, beta = task.rewards(), 1.0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = time.perf_counter()
    for _ in range(80):
        j = objective(enumerated_logprobs(model, tokenizer, task), ref, rewards, beta)
        optimizer.zero_grad()
        (-j).backward()
        optimizer.step()
    with torch.no_grad():
        final = enumerated_logprobs(model, tokenizer, task)
    j_start = objective(ref, ref, rewards, beta).item()
    j_end = objective(final, ref, rewards, beta).item()
    j_star = optimal_objective(ref, rewards, beta).item()
    reached = closure(j_start, j_end, j_star)
    seconds = time.perf_counter() - start
    print(f"exact ascent: J {j_start:.4f} -> {j_end:.4f}, J* {j_star:.4f}, closure {reached:.3f}")
    print(f"(80 Adam steps, lr 1e-2, {seconds:.1f}s)")
    return model, ref, final, reached


def test_enumerated_rows_are_distributions(tiny):
    task, tokenizer, model = tiny
    logprobs = enumerated_logprobs(model, tokenizer, task, temperature=0.7)
    assert logprobs.shape == (4, 64) and logprobs.requires_grad
    torch.testing.assert_close(logprobs.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)
    chunked = enumerated_logprobs(model, tokenizer, task, temperature=0.7, batch_size=50)
    torch.testing.assert_close(chunked, logprobs, atol=1e-5, rtol=1e-5)


def test_exact_ascent_closes_most_of_the_gap(ascended):
    _, ref, final, reached = ascended
    assert reached > 0.5
    torch.testing.assert_close(final.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_agrees_with_exact_logprobs(tiny, ascended, temperature):
    task, tokenizer, _ = tiny
    model = ascended[0]
    with torch.no_grad():
        exact = enumerated_logprobs(model, tokenizer, task, temperature)[1].exp()  # prompt 1, [N]
    assert 0.5 * (exact - 1 / 64).abs().sum() > 0.2  # far from uniform: the check can fail
    prompt = torch.tensor([encode_prompt(tokenizer, task.prompts()[1])])
    torch.manual_seed(1)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        temperature=temperature,
        logits_processor=[AllowedTokensLogitsProcessor(task.allowed_token_ids(tokenizer))],
        num_return_sequences=3000,
        pad_token_id=tokenizer.pad_token_id,
        **task.generation_kwargs(tokenizer),
    )
    responses = tokenizer.batch_decode(out[:, prompt.shape[1] :])
    index = {text: j for j, text in enumerate(task.response_texts())}
    counts = torch.bincount(torch.tensor([index[y] for y in responses]), minlength=64)
    assert 0.5 * (counts / 3000 - exact).abs().sum() < 0.1  # total variation
