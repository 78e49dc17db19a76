"""A user's own data and models, end to end: `data=jsonl` in TRL's explicit, implicit-prompt and
conversational formats, `model=hf` from a local checkpoint folder, and a malformed file failing
through `train.py` with its file:row."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TINY, TINY_TASK, TINY_TRAINING, compose, train_cli
from hydra.utils import instantiate
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from rlhf_lightning.artifacts import MANIFEST
from rlhf_lightning.context import RunContext
from rlhf_lightning.models.tokenizer import build_tokenizer
from rlhf_lightning.rewards.learned import LearnedReward
from rlhf_lightning.run import run
from rlhf_lightning.tasks.reviews import ReviewsTask

N_ROWS = 64


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[dict]:
    """64 (prompt, chosen, rejected) rows of the reviews task, as a user's file would hold them."""
    task = ReviewsTask(n_sft=8, n_pairs_train=N_ROWS, n_pairs_val=4, n_pairs_test=4)
    directory = task.write(tmp_path_factory.mktemp("reviews"))
    rows = [json.loads(line) for line in (directory / "prefs_train.jsonl").read_text().splitlines()]
    return rows[:N_ROWS]


def explicit(row: dict) -> dict:
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def implicit(row: dict) -> dict:
    return {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}


def conversational(row: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def read_as(fmt, record, row: dict) -> bool:
    """Is `record` what the loader must make of `row` written in format `fmt`?"""
    if fmt is implicit:  # the prompt is the texts' common prefix, cut back to a word boundary
        return (
            record.prompt.startswith(row["prompt"])
            and record.prompt + record.chosen == row["prompt"] + row["chosen"]
            and record.prompt + record.rejected == row["prompt"] + row["rejected"]
        )
    prompt = row["prompt"]
    if fmt is conversational:  # DEFAULT_CHAT_TEMPLATE: the tiny tokenizer has no chat template
        prompt = f"<|user|>\n{prompt}\n<|assistant|>\n"
    return (record.prompt, record.chosen, record.rejected) == (
        prompt,
        row["chosen"],
        row["rejected"],
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", [explicit, implicit, conversational], ids=lambda f: f.__name__)
def test_rm_stage_on_a_users_jsonl(fmt, pairs, tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [fmt(row) for row in pairs])
    cfg = compose(["stage=rm", *TINY, "data=jsonl", f"data.path={path}"], tmp_path)
    run(cfg)
    artifact = tmp_path / "artifacts" / "custom" / "rm"  # data.name defaults to `custom`
    metrics = json.loads((artifact / MANIFEST).read_text())["metrics"]
    assert "val/bayes_accuracy" not in metrics  # a user's data has no known ceiling
    assert all(math.isfinite(metrics[k]) for k in ("val/loss", "val/accuracy", "val/margin"))
    # The held-out rows are the file's rows, read as the format says ...
    val = instantiate(cfg.data).load("prefs", "val").records
    assert len(val) == round(0.1 * N_ROWS)  # data.val_fraction
    for record in val:
        assert any(read_as(fmt, record, row) for row in pairs), record
    # ... and the logged val/accuracy is the saved model's accuracy on exactly those rows.
    reward = LearnedReward(path=str(artifact)).setup(RunContext(cfg))
    prompts = [r.prompt for r in val]
    chosen = reward.raw(prompts, [r.chosen for r in val])
    rejected = reward.raw(prompts, [r.rejected for r in val])
    assert metrics["val/accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    with open(tmp_path / "run" / "csv" / "rm" / "metrics.csv") as f:
        steps = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(steps) == math.ceil((N_ROWS - len(val)) / 32)  # one epoch over the train rows


# ---- model=hf: a local checkpoint folder, loaded with from_pretrained and no network -------------


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A Llama causal LM + tokenizer saved with save_pretrained, like a downloaded checkpoint:
    hidden size 24 (no tiny default has it) and no pad token (as Llama checkpoints ship)."""
    directory = tmp_path_factory.mktemp("hf_checkpoint")
    tokenizer = build_tokenizer(ReviewsTask(n_sft=8, n_pairs_train=8).corpus(), vocab_size=300)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def hf_overrides(checkpoint: Path) -> list[str]:
    return ["stage=rm", *TINY_TASK, *TINY_TRAINING, "model=hf", f"model.name_or_path={checkpoint}"]


def test_hf_reward_model_starts_from_the_checkpoint(hf_checkpoint, tmp_path):
    ctx = RunContext(compose(hf_overrides(hf_checkpoint), tmp_path))
    saved = LlamaForCausalLM.from_pretrained(hf_checkpoint).model.embed_tokens.weight
    initial = ctx.model_spec.reward_model(ctx.tokenizer).model.embed_tokens.weight
    torch.testing.assert_close(initial, saved)  # loaded from the folder, not initialised anew


@pytest.fixture(scope="module")
def hf_run(hf_checkpoint, tmp_path_factory):
    """`stage=rm model=hf` on the TINY task: (artifact dir, warnings raised while training)."""
    root = tmp_path_factory.mktemp("hf_run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(compose(hf_overrides(hf_checkpoint), root))
    return root / "artifacts" / "reviews" / "rm", [str(w.message) for w in caught]


def test_rm_stage_from_a_local_hf_checkpoint(hf_checkpoint, hf_run):
    artifact, _ = hf_run
    saved = LlamaForCausalLM.from_pretrained(hf_checkpoint).model.embed_tokens.weight
    config = AutoConfig.from_pretrained(artifact)
    assert (config.hidden_size, config.num_labels) == (24, 1)
    assert config.pad_token_id == AutoTokenizer.from_pretrained(artifact).pad_token_id is not None
    trained = AutoModelForSequenceClassification.from_pretrained(artifact)
    assert trained.model.embed_tokens.weight.shape == saved.shape  # same vocabulary
    assert not torch.equal(trained.model.embed_tokens.weight, saved)  # and it was trained
    vocab = AutoTokenizer.from_pretrained(hf_checkpoint).get_vocab()
    assert AutoTokenizer.from_pretrained(artifact).get_vocab() == vocab


def test_hf_reward_model_trains_in_train_mode(hf_run):
    """from_pretrained returns a model in eval mode; Lightning 2.x keeps submodule modes, so
    without a `.train()` the checkpoint's dropout would be off while it trains."""
    _, messages = hf_run
    assert not [m for m in messages if "in eval mode at the start of training" in m]


def test_hf_model_gets_its_own_tokenizer_after_a_tiny_run(hf_checkpoint, tmp_path):
    """The tokenizer cache artifacts/<task>/tokenizer must not hand model=hf the tokenizer a
    model=tiny run trained earlier in the same root (different vocabulary, wrong ids)."""
    tiny = RunContext(compose(["stage=rm", *TINY], tmp_path)).tokenizer
    hf = RunContext(compose(hf_overrides(hf_checkpoint), tmp_path)).tokenizer
    expected = AutoTokenizer.from_pretrained(hf_checkpoint).get_vocab()
    assert tiny.get_vocab() != expected
    assert hf.get_vocab() == expected


# ---- a malformed file fails through train.py with its file:row --------------------------------


@pytest.mark.slow  # a subprocess: imports torch, transformers and lightning afresh
def test_malformed_file_fails_with_file_and_row(pairs, tmp_path):
    rows = [explicit(r) for r in pairs[:5]]
    del rows[2]["chosen"]  # row 3
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = train_cli(["stage=rm", *TINY, "data=jsonl", f"data.path={path}"], tmp_path, 120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}:row 3: ")
    assert "'chosen'" in lines[0] and "fix:" in lines[0]
    assert not (tmp_path / "artifacts" / "custom" / "rm").exists()


def test_conversational_rows_render_with_the_tokenizer_they_are_loaded_with(tmp_path):
    """Rows read once without a tokenizer (the default template) are not handed to a caller that
    passes one (eval.py read SmolLM2's prompts through the default template: another input than
    the policy and the reward model were trained on)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from rlhf_lightning.data.spec import FileData
    from rlhf_lightning.evaluate.context import EvalContext

    path = tmp_path / "chat.jsonl"
    row = {
        "prompt": [{"role": "user", "content": "Say hi."}],
        "chosen": [{"role": "assistant", "content": "Hi!"}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    path.write_text(json.dumps(row) + "\n")
    tokenizer = build_tokenizer(["Say hi. Hi! No."] * 4, 300)  # given a template of its own
    tokenizer.chat_template = (
        "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<<assistant>>{% endif %}"
    )
    data = FileData(str(path), val_path=str(path))
    default = data.load("prompts", "eval").records[0].prompt
    ours = data.load("prompts", "eval", tokenizer).records[0].prompt
    assert ours == "<<user>>Say hi.<<assistant>>" and default != ours
    ctx = SimpleNamespace(data=data, task=None, tokenizer=tokenizer)
    ctx.cfg = OmegaConf.create({"prompts": None, "pairs": None, "n_prompts": None})
    assert EvalContext.prompts(ctx) == [ours]  # eval.py: the policy's template
    assert EvalContext.pairs(ctx, tokenizer)[0].prompt == ours  # mode=rm: the RM's template
