"""Speed-ups that must not change a number: the fused old-log-prob pass and batched tokenisation."""

from __future__ import annotations

import torch
from policy_helpers import algorithm_from_conf, build_module, build_oracle, train

from rlhf_lightning.data.encoding import (
    encode_prompt,
    encode_prompts,
    encode_response,
    encode_responses,
)
from rlhf_lightning.models.tokenizer import build_tokenizer
from rlhf_lightning.modules.policy import PolicyModule


class _Unfused(PolicyModule):
    fuses_old_logprobs = False  # always the separate no-grad forward for log p_old


def test_fused_update_equals_a_separate_old_logprob_pass():
    oracle = build_oracle(seed=0, sft_steps=10)
    fused = build_module(oracle, algorithm_from_conf("rloo"), beta=0.1, lr=1e-2)
    unfused = build_module(oracle, algorithm_from_conf("rloo"), beta=0.1, lr=1e-2)
    unfused.__class__ = _Unfused
    assert fused.fuses_old_logprobs and not unfused.fuses_old_logprobs
    before = [p.detach().clone() for p in fused.policy.parameters()]
    for module in (fused, unfused):
        train(module, steps=3, prompts_per_step=4)
    moved = max(float((p - q).abs().max()) for p, q in zip(fused.policy.parameters(), before))
    assert moved > 1e-3  # the updates did something
    for p, q in zip(fused.policy.parameters(), unfused.policy.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_fused_only_without_value_head_and_with_one_update_per_rollout():
    oracle = build_oracle(seed=0, sft_steps=0)
    assert not build_module(oracle, algorithm_from_conf("ppo")).fuses_old_logprobs
    rloo_two_epochs = algorithm_from_conf("rloo", epochs=2)
    assert not build_module(oracle, rloo_two_epochs).fuses_old_logprobs


def test_batched_encoding_equals_one_by_one():
    tokenizer = build_tokenizer(["the plot was great . a dull film ."] * 20, vocab_size=300)
    texts = ["the plot", "a dull film .", "the plot", "", "zebra ünïcode"]
    assert encode_prompts(tokenizer, texts) == [encode_prompt(tokenizer, t) for t in texts]
    assert encode_responses(tokenizer, texts) == [encode_response(tokenizer, t) for t in texts]
    no_eos = encode_responses(tokenizer, texts, eos=False)
    assert no_eos == [encode_response(tokenizer, t, eos=False) for t in texts]
    assert encode_prompts(tokenizer, []) == [] and encode_responses(tokenizer, []) == []
