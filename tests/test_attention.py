"""Attention's float32 backward for short half-precision CPU passes (`models/attention.py`): the
forward is SDPA's own, bit for bit; the gradient is at least as close to float64's as SDPA's."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from rlhf_lightning.models import attention as A
from rlhf_lightning.models.heads import position_ids
from rlhf_lightning.models.logprobs import response_logprobs
from rlhf_lightning.models.reward_scores import reward_scores


def _inputs(batch=3, heads=4, kv_heads=4, lq=9, lk=13, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, 16, generator=g).to(dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, lk, 16, generator=g).to(dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, lk, 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(batch, heads, lq, 16, generator=g)
    return q, k, v, w


def _padded_mask(batch, lq, lk):
    """Causal over a cache (queries are the last lq of lk), row 0 left-padded by 3: its first
    two queries see no key at all."""
    mask = (torch.arange(lk)[None] <= torch.arange(lq)[:, None] + (lk - lq)).repeat(batch, 1, 1, 1)
    mask[0, :, :, :3] = False
    mask[0, :, :2] = False
    return mask


CASES = {
    "bool mask": dict(mask="bool"),
    "additive mask": dict(mask="float"),
    "square causal": dict(lq=11, lk=11, is_causal=True),
    "grouped heads, causal": dict(kv_heads=2, lq=11, lk=11, is_causal=True, enable_gqa=True),
    "float16": dict(mask="bool", dtype=torch.float16),
}


def _call(fn, q, k, v, w, case):
    mask = None
    if case.get("mask"):
        mask = _padded_mask(q.shape[0], q.shape[2], k.shape[2])
        if case["mask"] == "float":
            # in the inputs' dtype (0 and −inf are exact in each): a float32 mask beside float64
            # inputs sent the float64 reference down a path that misread it on an AVX2-only CPU
            mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    kwargs = dict(attn_mask=mask, is_causal=case.get("is_causal", False))
    if case.get("enable_gqa"):
        kwargs["enable_gqa"] = True
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, **kwargs)
    (out.float().nan_to_num(0.0) * w).sum().backward()
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


def _error(grads, reference):
    return max(
        float((g.double() - r).abs().max() / r.abs().max()) for g, r in zip(grads, reference)
    )


@pytest.mark.parametrize("name", list(CASES))
def test_forward_is_sdpas_bit_for_bit_and_the_gradient_as_close_to_float64(name):
    case = CASES[name]
    shape = {k: case[k] for k in ("kv_heads", "lq", "lk", "dtype") if k in case}
    q, k, v, w = _inputs(**shape)
    stock, stock_grads = _call(F.scaled_dot_product_attention, q, k, v, w, case)
    with A.train_attention():
        taken = []
        with _spy(taken):
            ours, our_grads = _call(F.scaled_dot_product_attention, q, k, v, w, case)
    assert taken == [True]
    assert torch.equal(ours.nan_to_num(7.0), stock.nan_to_num(7.0))
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, reference = _call(F.scaled_dot_product_attention, *exact, w, case)
    assert all(torch.isfinite(g).all() for g in our_grads)
    assert _error(our_grads, reference) <= max(_error(stock_grads, reference), 1e-2)
    assert _error(our_grads, reference) <= 1e-2  # bf16 inputs; measured 2–5e-3


@contextlib.contextmanager
def _spy(taken: list):
    original = A.takes_over

    def spy(call):
        taken.append(original(call))
        return taken[-1]

    A.takes_over = spy
    try:
        yield
    finally:
        A.takes_over = original


def test_under_autocast_it_casts_as_autocast_does():
    """RoPE leaves q, k in float32 and v in bfloat16 under autocast: both paths compute in bf16."""
    q, k, v, w = _inputs(dtype=torch.float32)
    v = v.detach().bfloat16().requires_grad_()
    case = dict(mask="bool")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock, _ = _call(F.scaled_dot_product_attention, q, k, v, w, case)
        taken = []
        with A.train_attention(), _spy(taken):
            ours, grads = _call(F.scaled_dot_product_attention, q, k, v, w, case)
    assert taken == [True] and ours.dtype == torch.bfloat16
    assert torch.equal(ours.nan_to_num(7.0), stock.nan_to_num(7.0))
    assert [g.dtype for g in grads] == [torch.float32, torch.float32, torch.bfloat16]


@pytest.mark.parametrize(
    "why",
    ["float32", "no grad", "long", "dropout", "causal over a cache", "grouped heads without gqa"],
)
def test_sdpa_keeps_the_calls_it_is_not_measured_on(why):
    dtype = torch.float32 if why == "float32" else torch.bfloat16
    lq, lk = (200, 200) if why == "long" else (9, 13)
    kv_heads = 2 if why == "grouped heads without gqa" else 4
    q, k, v, _ = _inputs(dtype=dtype, lq=lq, lk=lk, kv_heads=kv_heads)
    call = dict(query=q, key=k, value=v, attn_mask=_padded_mask(3, lq, lk))
    if why == "no grad":
        call.update(query=q.detach(), key=k.detach(), value=v.detach())
    if why == "dropout":
        call["dropout_p"] = 0.1
    if why == "causal over a cache":
        call.update(attn_mask=None, is_causal=True)
    assert not A.takes_over(call)
    assert A.takes_over(dict(call, **_fit(call, why)))  # the same call without the reason


def _fit(call, why):
    q, k, v = call["query"], call["key"], call["value"]
    fixes = {
        "float32": dict(query=q.bfloat16(), key=k.bfloat16(), value=v.bfloat16()),
        "no grad": dict(query=q.requires_grad_(), key=k, value=v),
        "long": dict(query=q[:, :, :100], key=k[:, :, :100], value=v[:, :, :100], attn_mask=None),
        "dropout": dict(dropout_p=0.0),
        "causal over a cache": dict(key=k[:, :, :9], value=v[:, :, :9]),
        "grouped heads without gqa": dict(enable_gqa=True),
    }
    return fixes[why]


def test_the_context_is_a_no_op_without_grad_and_enters_once():
    with torch.no_grad():
        assert isinstance(A.train_attention(), contextlib.nullcontext)
    with A.train_attention():
        assert isinstance(A.train_attention(), contextlib.nullcontext)


def test_a_float32_pass_does_not_enter_it_and_a_bf16_one_does():
    model = torch.nn.Linear(2, 2)
    assert isinstance(A.train_attention(model), contextlib.nullcontext)  # float32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not isinstance(A.train_attention(model), contextlib.nullcontext)
    assert not isinstance(A.train_attention(model.bfloat16()), contextlib.nullcontext)


def _llama(**extra):
    config = T.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (4, 12))
    attention = torch.ones_like(ids)
    attention[1, :3] = 0  # a left-padded prompt
    attention[2, -2:] = 0  # a response that ended early
    mask = torch.zeros(ids.shape)
    mask[:, 6:] = attention[:, 6:].float()
    return ids, attention, mask


def _policy_pass(model, ids, attention, mask):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = response_logprobs(model, ids, attention, mask, position_ids=position_ids(attention))
    out.logprobs.sum().backward()
    return out.logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_bf16_policy_pass_scores_the_same_and_its_gradient_stays_sdpas(monkeypatch):
    """On a tiny grouped-query Llama under bf16 autocast: log-probs bit for bit those of the
    pass without the context (so a no-grad pass of the same weights scores the same), and every
    parameter's gradient within bf16 round-off of SDPA's own backward."""
    model, (ids, attention, mask) = _llama(), _batch()
    taken = []
    with _spy(taken):
        ours, our_grads = _policy_pass(model, ids, attention, mask)
    assert taken.count(True) == 2  # both layers' attention (the rest: one-time float64 probes)
    monkeypatch.setattr("rlhf_lightning.models.logprobs.train_attention", contextlib.nullcontext)
    stock, stock_grads = _policy_pass(model, ids, attention, mask)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scored = response_logprobs(
            model, ids, attention, mask, position_ids=position_ids(attention)
        )
    assert torch.equal(ours, stock) and torch.equal(ours, scored.logprobs)
    for name, grad in stock_grads.items():
        scale = float(grad.abs().max()) or 1.0
        assert float((our_grads[name] - grad).abs().max()) <= 3e-2 * scale, name


def test_reward_scores_under_grad_take_it_too():
    config = _llama().config
    config.num_labels = 1
    model = T.AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    ids, attention, _ = _batch()
    taken = []
    with _spy(taken), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = reward_scores(model, ids, attention)
    scores.sum().backward()
    assert taken.count(True) == 2  # both layers (the rest: the score head's float64 probe)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_model_with_activation_checkpointing_keeps_sdpas_backward():
    """Its backward recomputes the forward outside the context; the first forward must save
    what the recomputation saves, or torch's checkpoint refuses the backward."""
    model, (ids, attention, mask) = _llama(), _batch()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    taken = []
    with _spy(taken), torch.autocast("cpu", dtype=torch.bfloat16):
        out = response_logprobs(model, ids, attention, mask, position_ids=position_ids(attention))
    out.logprobs.sum().backward()
    assert not any(taken)
    assert all(p.grad is not None for p in model.parameters())
