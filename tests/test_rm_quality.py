"""The reward-model quality options (issue 15): weight-decay parameter groups, plain-shuffle
batches, the score head's initialisation and `rm.init_from_sft` (the SFT backbone under a new
score head), with their start-up rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY, compose, train_cli, with_paths
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

from rlhf_lightning.config import validate
from rlhf_lightning.data.batching import LengthGroupedBatchSampler
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.modules.optim import weight_decay_groups
from rlhf_lightning.modules.reward_model import RewardModelModule
from rlhf_lightning.run import run


def tiny_classifier(**kwargs):
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=1,
        pad_token_id=0,
        **kwargs,
    )
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def group_names(model, groups) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


def test_norms_biases_and_embeddings_get_no_weight_decay():
    model = tiny_classifier(attention_bias=True)  # q/k/v/o biases
    decay, no_decay = group_names(model, weight_decay_groups(model, model.parameters()))
    assert no_decay == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        *(f"model.layers.0.self_attn.{x}_proj.bias" for x in "qkvo"),
    }
    assert "score.weight" in decay and "model.layers.0.mlp.up_proj.weight" in decay
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    assert not decay & no_decay
    (everything,) = group_names(model, weight_decay_groups(model, model.parameters(), []))
    assert everything == decay | no_decay


def test_tied_embedding_is_one_no_decay_parameter():
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    lm = AutoModelForCausalLM.from_config(config)
    groups = weight_decay_groups(lm, lm.parameters())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(lm.parameters()))
    assert any(p is lm.lm_head.weight for p in groups[1]["params"])  # the embedding, tied


def test_adamw_decays_only_the_decay_group():
    """Zero gradients: AdamW's step is the decoupled decay alone, w ← w (1 − lr · λ)."""
    model = tiny_classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(
        weight_decay_groups(model, model.parameters()), lr=0.1, weight_decay=0.5
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        shrunk = "norm" not in name and "embed" not in name
        expected = before[name] * (1 - 0.1 * 0.5) if shrunk else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)


def test_rm_module_passes_no_decay_to_its_optimizer():
    model = tiny_classifier()
    module = RewardModelModule(model, optimizer=torch.optim.AdamW, no_decay=["norm"])
    groups = weight_decay_groups(module, module.trained_parameters(), module.no_decay)
    assert group_names(module, groups)[1] == {
        f"reward_model.{n}" for n, _ in model.named_parameters() if "norm" in n
    }


def test_length_group_one_is_a_plain_shuffle():
    lengths = [i % 97 for i in range(640)]
    spread = {}
    for group in (1, 50):
        batches = list(LengthGroupedBatchSampler(lengths, 32, seed=3, group=group))
        assert sorted(i for b in batches for i in b) == list(range(640))
        spread[group] = sum(
            max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches
        )
    assert spread[1] > 10 * spread[50]  # grouped batches are narrow, shuffled ones span the range


@pytest.mark.parametrize(
    "override, key",
    [
        ("rm.length_group=0", "rm.length_group"),
        ("rm.init_from_sft=yes", "rm.init_from_sft"),
        ("rm.score_init_std=-1", "rm.score_init_std"),
        ("rm.module.no_decay=[bias,layernorm]", "rm.module.no_decay"),
        ("rm.module.no_decay=weights", "rm.module.no_decay"),
    ],
)
def test_bad_quality_options_fail_at_start_up(override, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose(["stage=rm", override], tmp_path))


def test_score_init_std_zero_starts_every_score_at_zero(tiny_cfg):
    from rlhf_lightning.context import RunContext
    from rlhf_lightning.stages.rm import initial_reward_model

    tiny_cfg.rm.score_init_std = 0.0
    model = initial_reward_model(RunContext(tiny_cfg))
    assert torch.count_nonzero(model.score.weight) == 0


def test_init_from_sft_starts_from_the_sft_backbone(tmp_path, monkeypatch):
    """The RM's backbone equals the SFT model's at step 0; the score head is new, and trains."""
    run(with_paths(compose(["stage=sft", *TINY]), tmp_path))
    sft = AutoModelForCausalLM.from_pretrained(tmp_path / "artifacts" / "reviews" / "sft")
    at_start = {}
    monkeypatch.setattr(
        RewardModelModule,
        "on_fit_start",
        lambda self: at_start.update(
            {k: v.detach().clone() for k, v in self.reward_model.state_dict().items()}
        ),
    )
    run(with_paths(compose(["stage=rm", *TINY, "rm.init_from_sft=true"]), tmp_path))
    backbone = {k: v for k, v in sft.state_dict().items() if k.startswith("model.")}
    assert backbone and set(backbone) | {"score.weight"} == set(at_start)
    for key, value in backbone.items():
        torch.testing.assert_close(at_start[key], value, rtol=0, atol=0, msg=key)
    trained = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "artifacts" / "reviews" / "rm"
    )
    assert not torch.equal(trained.model.norm.weight, backbone["model.norm.weight"])  # it moved


def test_init_from_sft_without_the_artifact_fails_in_one_line(tmp_path: Path):
    result = train_cli(["stage=rm", *TINY, "rm.init_from_sft=true"], tmp_path, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: missing SFT artifact"), result.stderr
    assert "python train.py stage=sft" in lines[0]
