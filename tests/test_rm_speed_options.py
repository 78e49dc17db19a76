"""Reward-model speed options (issue 22): `rm.trainable_layers` trains only the top blocks, the
final norm and the score head; `rm.lora` trains a LoRA adapter and the score head. Both save an
ordinary sequence classifier that transformers scores as our reward does."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, compose
from transformers import AutoModelForSequenceClassification

import rlhf_lightning.stages.rm as rm_stage
from rlhf_lightning.config import validate
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.run import run

RM = [*TINY, "stage=rm", "logger=none", "callbacks=none", "rm.module.optimizer.lr=1e-2"]
RM += ["model.config.num_hidden_layers=2"]  # a lower block to freeze


def trained(tmp_path, monkeypatch, *overrides):
    """(initial state dict, the saved artifact) of a tiny RM run with `overrides`."""
    seen = {}
    original = rm_stage.initial_reward_model

    def spy(ctx):
        model = original(ctx)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        seen["init"] = {k: v.detach().clone() for k, v in base.state_dict().items()}
        return model

    monkeypatch.setattr(rm_stage, "initial_reward_model", spy)
    run(compose([*RM, *overrides], tmp_path))
    folder = tmp_path / "artifacts" / "reviews" / "rm"
    return seen["init"], AutoModelForSequenceClassification.from_pretrained(folder), folder


def test_trainable_layers_trains_only_the_top_blocks_and_the_head(tmp_path, monkeypatch):
    init, saved, _ = trained(tmp_path, monkeypatch, "rm.trainable_layers=1")
    after = saved.state_dict()
    for name, value in init.items():
        moved = not torch.equal(value, after[name])
        top = name.startswith(("model.layers.1.", "model.norm.", "score."))
        assert moved == top or (top and "norm" in name), name  # norms may sit at their init
    assert any(not torch.equal(init[n], after[n]) for n in after if n.startswith("model.layers.1."))


def test_lora_trains_an_adapter_and_saves_a_plain_reward_model(tmp_path, monkeypatch):
    from rlhf_lightning.context import RunContext
    from rlhf_lightning.rewards.learned import LearnedReward

    init, saved, folder = trained(tmp_path, monkeypatch, "rm.lora={r:4,alpha:8}")
    after = saved.state_dict()
    assert torch.equal(init["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(init["score.weight"], after["score.weight"])
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(init[f"{q}.base_layer.weight"], after[f"{q}.weight"])  # B·A merged
    assert not any("lora" in name for name in after)
    reward = LearnedReward(path=str(folder), normalise=False)
    reward.setup(RunContext(compose(RM, tmp_path)))
    ids = reward.encode(["review of the film :"], [" the plot was great ."])
    with torch.no_grad():
        own = saved.eval()(input_ids=torch.tensor(ids)).logits[:, 0]
    got = reward.raw(["review of the film :"], [" the plot was great ."])
    torch.testing.assert_close(got, own, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rm.trainable_layers=0"], "rm.trainable_layers=0 is invalid"),
        (["rm.lora={r:0}"], "rm.lora.r"),
        (["rm.lora={r:4}", "rm.trainable_layers=1"], "choose one"),
    ],
)
def test_bad_speed_options_fail_at_start_up(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        validate(compose([*RM, *overrides], tmp_path))


# ---- rm.num_layers: the bottom blocks only ----------------------------------------------------


def _two_layer_config(family: str):
    """A 2-block scalar-head config of each Hub family the project loads."""
    from transformers import GPT2Config, GPTNeoXConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=64, num_labels=1, pad_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, **common)
    if family == "pythia":
        return GPTNeoXConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, **common,
        )  # fmt: skip
    if family == "qwen2":  # has per-layer `layer_types`
        return Qwen2Config(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=32, max_position_embeddings=32, **common,
        )  # fmt: skip
    return OPTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        word_embed_proj_dim=16, max_position_embeddings=32, **common,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["gpt2", "pythia", "qwen2", "opt"])
def test_keep_bottom_layers_saves_a_model_transformers_loads_as_it_is(family, tmp_path):
    """Cut to 1 block: every weight left is the full model's own, and the saved folder loads with
    no missing or unused weights and scores as the cut model does."""
    from rlhf_lightning.models.factory import keep_bottom_layers, transformer_blocks

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(_two_layer_config(family)).eval()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    keep_bottom_layers(model, 1)
    assert len(transformer_blocks(model)) == 1
    cut = model.state_dict()
    assert len(cut) < len(full) and all(torch.equal(v, full[k]) for k, v in cut.items())
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert loaded.config.num_hidden_layers == 1
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(1, 64, (3, 7))
    with torch.no_grad():  # ~1e-9 apart: the loaded copy may pick another attention kernel
        torch.testing.assert_close(
            loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6
        )


def test_num_layers_trains_and_saves_the_bottom_blocks(tmp_path, monkeypatch):
    """rm.num_layers=1 of 2: the artifact has 1 block, trained from the checkpoint's first."""
    init, saved, folder = trained(tmp_path, monkeypatch, "rm.num_layers=1")
    assert saved.config.num_hidden_layers == 1
    assert not any(name.startswith("model.layers.1.") for name in saved.state_dict())
    assert not any(name.startswith("model.layers.1.") for name in init)  # cut before training
    moved = saved.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(init["model.layers.0.mlp.up_proj.weight"], moved)


def test_num_layers_beyond_the_model_fails_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="rm.num_layers=3 is invalid: this model has 2 layers"):
        run(compose([*RM, "rm.num_layers=3"], tmp_path))
