"""Real scale without changing a number: micro-batches, chunked no-grad passes, response-only
logits, float32 reward scores, vectorised keyed noise, activation checkpointing, bf16, OOM.

Every speed/memory mechanism is checked as an equality with the plain computation (and, for
whole runs, that the weights moved, so the equality cannot hold vacuously).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY, compose, train_cli
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
)

from rlhf_lightning.errors import ResourceError
from rlhf_lightning.generation.keyed import KeyedGumbelSampling, keyed_uniform
from rlhf_lightning.microbatch import optimiser_step, padded_fraction, plan, trim_columns
from rlhf_lightning.models.factory import ModelSpec, train_without_dropout
from rlhf_lightning.models.heads import position_ids
from rlhf_lightning.models.logprobs import aligned_logprobs, entropy_from_logits, response_logprobs
from rlhf_lightning.models.reward_scores import reward_scores

TOL = 1e-5

# ---- plans -------------------------------------------------------------------------------------


def test_plan_covers_every_unit_once_in_order():
    parts = plan(10, 4)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [p.tolist() for p in plan(5)] == [[0, 1, 2, 3, 4]]  # null: the whole batch
    assert plan(0, 3) == []


def test_token_budget_packs_short_units_together_and_long_ones_alone():
    lengths = [10, 100, 12, 11, 300, 9, 50, 13]
    parts = plan(len(lengths), lengths=lengths, max_tokens=200)
    assert sorted(i for p in parts for i in p.tolist()) == list(range(len(lengths)))
    for p in parts:
        longest = max(lengths[i] for i in p.tolist())
        assert len(p) == 1 or len(p) * longest <= 200
    assert [4] in [p.tolist() for p in parts]  # longer than the budget: alone
    capped = plan(len(lengths), size=2, lengths=lengths, max_tokens=10_000)
    assert max(len(p) for p in capped) == 2
    # grouping by length pads less than cutting in the batch's order
    fixed = plan(len(lengths), size=2)
    assert padded_fraction(lengths, capped) < padded_fraction(lengths, fixed)


def test_trim_columns_keeps_every_attended_position():
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    assert trim_columns(mask) == slice(1, 4)


def test_optimiser_step_frees_the_gradients_once_it_has_stepped():
    """What runs between two steps (validation, the policy's rollout) holds no gradient."""
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in layer.parameters()]
    seen = []

    def backward():
        layer(torch.ones(1, 3)).sum().backward()
        seen.extend(p.grad is not None for p in layer.parameters())

    optimiser_step(None, optimizer, backward)
    assert seen == [True, True]  # the step had gradients ...
    assert all(not torch.equal(a, p) for a, p in zip(before, layer.parameters()))  # ... took them
    assert all(p.grad is None for p in layer.parameters())  # ... and let them go


# ---- keyed noise -------------------------------------------------------------------------------


def test_keyed_uniform_depends_only_on_the_row_key_and_step():
    seeds = torch.tensor([3, 2**40 + 5, 7, 2**62 + 1])
    u = keyed_uniform(seeds, 5, 1000)
    assert u.shape == (4, 1000) and u.dtype == torch.float32
    assert bool(((u > 0) & (u < 1)).all())
    assert torch.equal(keyed_uniform(seeds[2:3], 5, 1000), u[2:3])  # alone = in a batch
    assert not torch.equal(keyed_uniform(seeds, 6, 1000), u)  # a new step draws anew
    assert not torch.equal(u[0], u[2])  # rows differ
    big = keyed_uniform(torch.arange(64), 0, 4096).double()
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002
    # neighbouring tokens and rows are uncorrelated
    corr = torch.corrcoef(torch.stack([big[:, :-1].flatten(), big[:, 1:].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.01


def test_keyed_uniform_int32_path_gives_the_int64_hashs_bits():
    """The [B, V] table runs in wrapping int32 arithmetic; every value equals the int64 reference
    (lowbias32 in uint32-in-int64 with split multiplies), so keyed samples did not change."""
    from rlhf_lightning.generation.keyed import MASK32, _mix32

    def reference(seeds, step, vocab):
        lo, hi = seeds[:, None] & MASK32, (seeds[:, None] >> 32) & MASK32
        row = _mix32(hi ^ _mix32(lo ^ _mix32(torch.full_like(lo, step & MASK32))))
        token = torch.arange(vocab, dtype=torch.int64)[None]
        return ((_mix32(_mix32(token ^ row) ^ lo) >> 9).float() + 0.5) * 2.0**-23

    seeds = torch.tensor([0, 3, 2**31, 2**32 - 1, 2**40 + 5, 2**62 + 1, 2**63 - 1, 987654321])
    for step in (0, 1, 47, 2**31 + 7):
        assert torch.equal(keyed_uniform(seeds, step, 49152), reference(seeds, step, 49152))


def test_keyed_gumbel_sampling_is_one_vectorised_draw_per_step():
    sampler = KeyedGumbelSampling([1, 2, 3], 1.0, torch.device("cpu"))
    scores = torch.zeros(3, 50)
    first, second = sampler(None, scores), sampler(None, scores)
    assert sampler.step == 2 and not torch.equal(first, second)


# ---- response-only logits ----------------------------------------------------------------------


def _llama(vocab=100, **kw):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        **kw,
    )
    return config


def _batch(vocab=100, B=4, T=12):
    torch.manual_seed(1)
    ids = torch.randint(1, vocab, (B, T))
    attention = torch.ones(B, T, dtype=torch.long)
    attention[0, :3] = 0  # left padding, as rollouts have
    response = torch.zeros(B, T)
    response[:, 6:] = 1
    response[1, 9:] = 0  # a response that ended early
    return ids, attention, response


def _plain(model, ids, attention, response):
    out = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention))
    return aligned_logprobs(out.logits, ids, response), out.logits


CAUSAL = {
    "llama": lambda: AutoModelForCausalLM.from_config(_llama()),
    "gpt2": lambda: AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    ),
    "gemma2-softcapped": lambda: AutoModelForCausalLM.from_config(
        Gemma2Config(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            final_logit_softcapping=5.0,
            pad_token_id=0,
        )
    ),
}


@pytest.mark.parametrize("name", list(CAUSAL))
@pytest.mark.parametrize("chunk", [2048, 5])
def test_response_logprobs_equal_full_logits_in_values_entropies_and_gradients(name, chunk):
    model = CAUSAL[name]().eval()
    ids, attention, response = _batch()
    plain, logits = _plain(model, ids, attention, response)
    model.zero_grad()
    plain.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ours = response_logprobs(
        model,
        ids,
        attention,
        response,
        position_ids=position_ids(attention),
        entropy=True,
        chunk_tokens=chunk,
    )
    assert torch.allclose(ours.logprobs, plain.detach(), atol=TOL, rtol=0)
    entropy = torch.cat([torch.zeros(4, 1), entropy_from_logits(logits[:, :-1])], 1) * response
    assert torch.allclose(ours.entropy, entropy.detach(), atol=TOL, rtol=0)
    ours.logprobs.sum().backward()
    scale = max(float(g.abs().max()) for g in expected.values())
    for n, p in model.named_parameters():
        if n in expected:
            assert float((p.grad - expected[n]).abs().max()) <= 1e-5 * max(scale, 1.0), n
    # soft-capped logits are not head(backbone): found, and scored through the model's forward
    assert model._rlhf_head_is_exact is (name != "gemma2-softcapped")


def test_response_logprobs_of_the_lora_reference_are_the_base_model():
    pytest.importorskip("peft")
    from rlhf_lightning.models.lora import AdapterDisabledReference, LoraSettings, add_lora

    base = CAUSAL["llama"]().eval()
    ids, attention, response = _batch()
    plain, _ = _plain(base, ids, attention, response)
    policy = add_lora(base, LoraSettings(r=2))
    for name, p in policy.named_parameters():  # move the adapter away from B = 0
        if "lora_B" in name:
            p.data.normal_()
    reference = AdapterDisabledReference(policy)
    ours = response_logprobs(
        reference, ids, attention, response, position_ids=position_ids(attention)
    )
    assert torch.allclose(ours.logprobs, plain.detach(), atol=TOL, rtol=0)
    adapted = response_logprobs(
        policy, ids, attention, response, position_ids=position_ids(attention)
    )
    assert not torch.allclose(adapted.logprobs, plain.detach(), atol=1e-3)


# ---- reward scores -----------------------------------------------------------------------------


def test_reward_scores_equal_the_sequence_classifier_and_stay_float32_under_bf16():
    config = _llama()
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config).eval()
    ids, attention = torch.randint(1, 100, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    attention[1, 6:] = 0
    ids[1, 6:] = 0  # right padding with the pad id, as the collators do
    expected = model(input_ids=ids, attention_mask=attention).logits[:, 0]
    ours = reward_scores(model, ids, attention)
    assert torch.allclose(ours, expected, atol=TOL, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = reward_scores(model, ids, attention)
    assert mixed.dtype == torch.float32


# ---- activation checkpointing ------------------------------------------------------------------


def _saved_bytes(model, ids, attention, response) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = response_logprobs(model, ids, attention, response).logprobs
    out.sum().backward()
    return total[0]


def test_activation_checkpointing_keeps_gradients_and_saves_less_even_without_dropout():
    ids, attention, response = _batch(T=64)
    grads, saved = [], []
    for checkpointing in (False, True):
        model = ModelSpec(gradient_checkpointing=checkpointing).trainable(
            AutoModelForCausalLM.from_config(_llama())
        )
        train_without_dropout(model)  # the policy stage's mode: eval, checkpointing still on
        saved.append(_saved_bytes(model, ids, attention, response))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert saved[1] < 0.5 * saved[0]
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


# ---- whole runs from the command line ----------------------------------------------------------


def _weights(root: Path, stage: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(root / "artifacts" / "reviews" / stage / "model.safetensors")


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _pipeline(root: Path, extra: list[str]) -> Path:
    out = train_cli(["stage=pipeline", *TINY, "callbacks=none", *extra], root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return root


# The policy takes plain gradient steps (SGD) in the full fine-tuning runs, so they compare the micro-batched and
# full-batch gradients: Adam divides each gradient by its own running scale, so float32 round-off
# (~1e-7) of a near-zero gradient becomes a ±lr step, and the RMs of the two runs (1e-7 apart,
# summed in another order) reach the policy through its rewards. Measured with Adam at lr 1e-3, PPO
# with token budgets: 1.2e-4 apart after the whole pipeline, 9.7e-6 from the same SFT and RM.
SGD = ["~policy.optimizer.betas", "policy.optimizer._target_=torch.optim.SGD"]
MICRO = {
    "rloo": (
        [*SGD, "policy.optimizer.lr=1.0"],
        [
            "sft.micro_batch_size=5",
            "rm.micro_batch_size=3",
            "policy.micro_batch_size=3",
            "policy.forward_batch_size=5",
        ],
    ),
    "ppo-token-budget": (
        ["algo=ppo", *SGD, "policy.optimizer.lr=1.0"],
        [
            "sft.max_tokens_per_micro_batch=300",
            "rm.max_tokens_per_micro_batch=200",
            "policy.max_tokens_per_micro_batch=100",
            "policy.forward_batch_size=8",
        ],
    ),
    "lora-checkpointing": (
        ["model.lora={r:4}", "policy.optimizer.lr=1e-2"],  # Adam: LoRA's B starts at 0
        [
            "policy.micro_batch_size=4",
            "policy.forward_batch_size=8",
            "model.gradient_checkpointing=true",
        ],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MICRO))
def test_micro_batched_runs_end_with_the_weights_of_full_batch_runs(case, tmp_path):
    common, micro = MICRO[case]
    full = _pipeline(tmp_path / "full", common)
    small = _pipeline(tmp_path / "micro", [*common, *micro])
    for stage in ("sft", "rm", "policy"):
        assert _max_diff(_weights(full, stage), _weights(small, stage)) <= TOL, stage
    assert _max_diff(_weights(full, "policy"), _weights(full, "sft")) > 1e-3  # it moved


# ---- precision and memory errors ---------------------------------------------------------------


@pytest.mark.slow
def test_bf16_mixed_pipeline_runs_end_to_end_on_the_cpu(tmp_path):
    out = train_cli(["stage=pipeline", *TINY, "trainer.precision=bf16-mixed"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    result = json.loads(next(tmp_path.rglob("result.json")).read_text())["results"]
    assert 0.5 < result["rm"]["accuracy"] <= 1.0  # float32 scores: no rounding to ties
    assert all(map(lambda v: v == v, (result["policy"]["kl"], result["policy"]["gold_reward"])))


def test_out_of_memory_names_stage_shape_and_settings_and_keeps_the_checkpoint(
    tmp_path, monkeypatch
):
    from rlhf_lightning.modules.reward_model import RewardModelModule
    from rlhf_lightning.run import run

    original = RewardModelModule.micro_loss

    def micro_loss(self, part):
        if self.training and self.global_step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, part)

    monkeypatch.setattr(RewardModelModule, "micro_loss", micro_loss)
    cfg = compose(["stage=rm", *TINY, "checkpoint.every_n_train_steps=2", "rm.micro_batch_size=8"])
    from helpers import with_paths

    with pytest.raises(ResourceError) as err:
        run(with_paths(cfg, tmp_path))
    message = str(err.value)
    assert "out of memory in the rm stage at 16 sequences ×" in message
    assert "rm.micro_batch_size" in message and "model.gradient_checkpointing=true" in message
    assert "\n" not in message
    (last,) = tmp_path.rglob("checkpoints/rm/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert not (tmp_path / "artifacts" / "reviews" / "rm").exists()
