"""LoRA policy with the adapter-disabled network as reference (`rlhf_lightning.models.lora`)."""

from __future__ import annotations

import functools
import json
import sys

import pytest
import torch
from helpers import compose
from hydra.utils import instantiate
from policy_helpers import algorithm_from_conf, build_oracle, train
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf_lightning.analysis.optimum import enumerated_logprobs
from rlhf_lightning.artifacts import save_model_artifact
from rlhf_lightning.callbacks.common import evaluation_mode
from rlhf_lightning.control.beta import FixedBeta
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.models.factory import ModelSpec
from rlhf_lightning.models.lora import AdapterDisabledReference, add_lora, export_for_saving
from rlhf_lightning.models.tokenizer import build_tokenizer
from rlhf_lightning.modules.policy import PolicyModule
from rlhf_lightning.rewards.gold import GoldReward

pytest.importorskip("peft")

SMALL = dict(  # the TINY_MODEL sizes: head_dim 16
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
)
BIG = dict(
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["the movie was great and the plot was bad"] * 20, vocab_size=270)


@pytest.fixture(scope="module")
def sft_path(tokenizer, tmp_path_factory):
    """A saved tiny Llama standing in for the SFT artifact."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sft")
    ModelSpec(config=SMALL).causal_lm(tokenizer).save_pretrained(path)
    return path


def batch(tokenizer, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (3, 9), generator=generator)  # [B, T]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def lora_pair(tokenizer, path, **lora):
    spec = ModelSpec(config=SMALL, lora={"r": 4, **lora})
    return spec.policy_and_reference(tokenizer, path=path)


def sgd_step(policy, inputs, lr: float = 0.5) -> None:
    """One step on the next-token NLL of `inputs` (moves the adapter away from B = 0)."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr)
    logits = policy(**inputs).logits  # [B, T, V]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), inputs["input_ids"][:, 1:].reshape(-1)
    )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def storages(params) -> dict[int, int]:
    """data_ptr -> bytes of every distinct storage behind `params` (tied weights count once)."""
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}


def test_only_the_adapter_trains(tokenizer, sft_path):
    policy, reference = lora_pair(tokenizer, sft_path)
    names = trainable_names(policy)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    # r·(in + out) per adapted projection: q,k,v,o 32→32; gate, up 32→64; down 64→32
    expected = 4 * (4 * (32 + 32) + 2 * (32 + 64) + (64 + 32))
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) == expected == 2176
    assert not any(p.requires_grad for p in reference.parameters())
    plain = AutoModelForCausalLM.from_pretrained(sft_path)
    assert sum(p.numel() for p in reference.parameters()) == sum(
        p.numel() for p in plain.parameters()
    )


def test_reference_is_the_base_model_while_the_policy_moves(tokenizer, sft_path):
    policy, reference = lora_pair(tokenizer, sft_path)
    policy.eval()  # as PolicyModule.on_fit_start: no dropout anywhere
    inputs = batch(tokenizer)
    with torch.no_grad():
        sft = AutoModelForCausalLM.from_pretrained(sft_path)(**inputs).logits
        ref_before, policy_before = reference(**inputs).logits, policy(**inputs).logits
    assert torch.equal(policy_before, ref_before)  # B = 0 at init: the adapter adds exact zeros
    torch.testing.assert_close(ref_before, sft, rtol=0, atol=1e-6)

    sgd_step(policy, inputs)
    with torch.no_grad():
        ref_after, policy_after = reference(**inputs).logits, policy(**inputs).logits
    assert torch.equal(ref_after, ref_before)  # bitwise: the base weights did not move
    assert (policy_after - policy_before).abs().max() > 1e-3
    assert trainable_names(policy)  # peft's disable_adapter re-enables grads; we restore them


def test_frozen_model_protocol_leaves_the_policy_trainable(tokenizer, sft_path):
    policy, reference = lora_pair(tokenizer, sft_path)
    policy.train()
    names = trainable_names(policy)
    assert reference.eval().requires_grad_(False) is reference  # what PolicyModule does
    reference.to("cpu")
    with evaluation_mode(reference, seed=0):  # what the evaluation callbacks do
        reference(**batch(tokenizer))
        reference.generate(**batch(tokenizer), max_new_tokens=3, do_sample=True, pad_token_id=0)
    assert trainable_names(policy) == names
    assert all(m.training for m in policy.modules())  # reference calls ran in eval, then restored
    assert not reference.training
    with pytest.raises(RuntimeError, match="cannot train"):
        reference.requires_grad_(True)

    policy.requires_grad_(False)  # a frozen adapter stays frozen (peft's context would thaw it)
    reference(**batch(tokenizer))
    assert trainable_names(policy) == []


def test_policy_module_trains_the_adapter_against_a_fixed_reference():
    """Two rollout+update steps through a real Trainer: p_ref (enumerated) does not move."""
    oracle = build_oracle(seed=0, sft_steps=5)
    policy = add_lora(oracle.reference.requires_grad_(True), ModelSpec(lora={"r": 2}).lora_settings)
    reference = AdapterDisabledReference(policy)
    before = enumerated_logprobs(reference, oracle.tokenizer, oracle.task)  # [P, N]
    reward = GoldReward()
    reward.task = oracle.task
    module = PolicyModule(
        policy=policy,
        reference=reference,
        reward=reward,
        tokenizer=oracle.tokenizer,
        algorithm=algorithm_from_conf("rloo", group_size=4),
        beta_controller=FixedBeta(0.1),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        generation=oracle.generation,
        exact=oracle.evaluator,
    )
    train(module, steps=2, prompts_per_step=2)
    after = enumerated_logprobs(reference, oracle.tokenizer, oracle.task)
    moved = enumerated_logprobs(policy, oracle.tokenizer, oracle.task).detach()
    assert torch.equal(after, before)
    assert (moved - before).abs().max() > 1e-4
    assert trainable_names(policy) and all("lora_" in n for n in trainable_names(policy))


def test_no_second_copy_of_the_weights(tokenizer, tmp_path):
    torch.manual_seed(0)
    ModelSpec(config=BIG).causal_lm(tokenizer).save_pretrained(tmp_path)
    base = sum(storages(AutoModelForCausalLM.from_pretrained(tmp_path).parameters()).values())

    policy, reference = ModelSpec(config=BIG).policy_and_reference(tokenizer, path=tmp_path)
    full = storages([*policy.parameters(), *reference.parameters()])
    assert sum(full.values()) == 2 * base
    assert not storages(policy.parameters()).keys() & storages(reference.parameters()).keys()

    spec = ModelSpec(config=BIG, lora={"r": 8})
    policy, reference = spec.policy_and_reference(tokenizer, path=tmp_path)
    assert storages(reference.parameters()).keys() <= storages(policy.parameters()).keys()
    # r·(in + out) fp32 per projection: q,k,v,o 512→512; gate, up 512→1024; down 1024→512
    adapter = 4 * 8 * (4 * (512 + 512) + 2 * (512 + 1024) + (1024 + 512)) * 4
    shared = storages([*policy.parameters(), *reference.parameters()])
    assert sum(shared.values()) == base + adapter == base + 1_114_112


def test_exported_policy_is_a_plain_merged_checkpoint(tokenizer, sft_path, tmp_path):
    policy, _ = lora_pair(tokenizer, sft_path)
    policy.eval()
    inputs = batch(tokenizer)
    sgd_step(policy, inputs)  # B ≠ 0, so merging has something to fold in
    with torch.no_grad():
        expected = policy(**inputs).logits
    names = trainable_names(policy)

    save_model_artifact(export_for_saving(policy), tokenizer, tmp_path / "policy", {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-5)
    saved = load_file(tmp_path / "policy" / "model.safetensors")
    assert saved and not [k for k in saved if "lora_" in k or "base_layer" in k]
    assert "peft" not in json.loads((tmp_path / "policy" / "config.json").read_text())

    # the live policy is untouched: unmerged, same outputs, same trainable adapter
    assert not any(getattr(m, "merged", False) for m in policy.modules())
    with torch.no_grad():
        assert torch.equal(policy(**inputs).logits, expected)
    assert trainable_names(policy) == names
    plain = AutoModelForCausalLM.from_pretrained(sft_path)
    assert export_for_saving(plain) is plain


def test_lora_override_composes():
    settings = instantiate(compose(["model.lora={r:8,alpha:16}"]).model).lora_settings
    assert (settings.r, settings.scale, settings.dropout) == (8, 16 / 8, 0.0)
    assert instantiate(compose([]).model).lora is None


@pytest.mark.parametrize(
    "lora, key",
    [
        ({"rank": 8}, "model.lora.rank"),
        ({"r": 0}, "model.lora.r"),
        ({"r": 2.5}, "model.lora.r"),
        ({"r": True}, "model.lora.r"),
        ({"r": 8, "alpha": 0}, "model.lora.alpha"),
        ({"dropout": 1.0}, "model.lora.dropout"),
        ({"target_modules": []}, "model.lora.target_modules"),
        (8, "model.lora"),
    ],
)
def test_bad_lora_config_is_one_line_naming_the_key(lora, key):
    with pytest.raises(ConfigError) as err:
        ModelSpec(lora=lora)
    message = str(err.value)
    assert message.startswith(f"{key}:") and "\n" not in message
    assert "e.g." in message  # how to fix it


def test_target_modules_missing_from_the_model(tokenizer, sft_path):
    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: .*wq"):
        lora_pair(tokenizer, sft_path, target_modules=["wq"])


def test_missing_peft_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e \.\[peft\]"):
        ModelSpec(lora={"r": 8})
    assert ModelSpec(lora=None).lora is None
