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
