"""Real checkpoint conventions: the checkpoint's tokenizer decides BOS, EOS, pad and the end of
turn, and the reward model scores a policy sample with exactly the ids it was trained on.

Checkpoints in four layouts (GPT-2, Pythia, Qwen2, OPT: `layouts.py`) are built offline; each
runs sft → rm → policy (~1 s each) on TRL explicit and conversational rows. Bad checkpoints and
settings fail through `train.py` with one line, exit 2, and nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import compose, train_cli
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st
from layouts import EOT, LAYOUTS, broken, save_checkpoint, tokenizer_of
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_lightning.config import validate
from rlhf_lightning.context import RunContext
from rlhf_lightning.data.batching import truncate
from rlhf_lightning.data.chat import DEFAULT_CHAT_TEMPLATE, render_completion, render_prompt
from rlhf_lightning.data.encoding import (
    encode_prompt,
    encode_prompts,
    encode_response,
    encode_sequences,
    layout,
    stop_token_ids,
)
from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.errors import CheckpointError, ConfigError
from rlhf_lightning.generation.sampling import decode_responses, sample
from rlhf_lightning.generation.settings import GenerationSettings
from rlhf_lightning.models.factory import ModelSpec, checkpoint_tokenizer
from rlhf_lightning.models.tokenizer import build_tokenizer
from rlhf_lightning.rewards.learned import LearnedReward
from rlhf_lightning.run import run
from rlhf_lightning.tasks.reviews import ReviewsTask

N_PAIRS = 32
USER = "review of the silent harbor :"


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    """32 (prompt, chosen, rejected) rows of the reviews task, as a user's file holds them."""
    task = ReviewsTask(n_sft=8, n_pairs_train=N_PAIRS, n_pairs_val=4, n_pairs_test=4)
    directory = task.write(tmp_path_factory.mktemp("reviews"))
    lines = (directory / "prefs_train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines][:N_PAIRS]


def texts(rows: list[dict]) -> list[str]:
    return [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]


@pytest.fixture(scope="module")
def checkpoints(rows, tmp_path_factory) -> dict[str, Path]:
    """One saved checkpoint folder per layout, its tokenizer trained on the rows."""
    return {
        name: save_checkpoint(name, texts(rows), tmp_path_factory.mktemp(name)) for name in LAYOUTS
    }


# ---- what is read from each tokenizer ------------------------------------------------------------

# layout -> (prefix tokens, eos token, stop tokens of generation)
EXPECTED = {
    "gpt2": ([], EOT, [EOT]),
    "pythia": ([], EOT, [EOT]),
    "qwen2": ([], "<|im_end|>", ["<|im_end|>", EOT]),  # + generation_config.json's ids
    "opt": (["</s>"], "</s>", ["</s>"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_is_read_from_the_checkpoint(name, checkpoints):
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(checkpoints[name])
    generation = AutoModelForCausalLM.from_pretrained(checkpoints[name]).generation_config
    prefix, eos, stops = EXPECTED[name]
    read = layout(tokenizer)
    assert tokenizer.convert_ids_to_tokens(list(read.prefix)) == prefix
    assert tokenizer.convert_ids_to_tokens(read.eos) == eos
    assert tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer, generation)) == stops
    plain = tokenizer(USER, add_special_tokens=False)["input_ids"]
    assert encode_prompt(tokenizer, USER) == tokenizer(USER)["input_ids"] == [*read.prefix, *plain]


def test_tiny_tokenizer_ids_are_unchanged(rows):
    """The offline tiny tokenizer keeps `<s> prompt` + `response </s>` (its post-processor's
    `<s> … </s>`), so every number measured with it holds."""
    tokenizer = build_tokenizer(texts(rows), vocab_size=300)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for row in rows[:8]:
        plain = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert encode_prompt(tokenizer, row["prompt"]) == [bos, *plain]
        chosen = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]
        assert encode_response(tokenizer, row["chosen"]) == [*chosen, eos]
        full = tokenizer(row["prompt"] + row["chosen"])["input_ids"]
        assert full[0] == bos and full[-1] == eos  # what transformers alone feeds the RM


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_response_ends_with_one_stop_token(name, rows):
    tokenizer = tokenizer_of(name, texts(rows))
    eos, text = tokenizer.eos_token, rows[0]["chosen"]
    once = encode_response(tokenizer, text)
    assert once[-1] == tokenizer.eos_token_id and once[-2] != tokenizer.eos_token_id
    assert encode_response(tokenizer, text + eos) == once  # already ends with EOS: nothing added
    middle = encode_response(tokenizer, eos + text)  # a stop token inside the text stays
    assert middle[0] == tokenizer.eos_token_id and middle[1:] == once


def test_a_chat_templates_end_of_turn_ends_the_response(rows):
    """Qwen2: the template closes the turn with `<|im_end|>\\n`; the response ends at
    `<|im_end|>` (the `\\n` after it is never generated) and gets no second EOS."""
    tokenizer = tokenizer_of("qwen2", texts(rows))
    prompt = [{"role": "user", "content": rows[0]["prompt"]}]
    reply = [{"role": "assistant", "content": rows[0]["chosen"]}]
    completion = render_completion(prompt, reply, tokenizer, "chosen")
    assert completion.endswith("<|im_end|>\n")
    ids = encode_response(tokenizer, completion)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids[-1] == end and ids.count(end) == 1
    assert ids == encode_response(tokenizer, rows[0]["chosen"])  # = the explicit row's ids


def test_an_end_of_turn_that_is_not_eos_is_a_stop_token(rows):
    """A Qwen2 base layout: EOS `<|endoftext|>`, the template's end of turn `<|im_end|>`. Both stop
    generation; a conversational response ends at `<|im_end|>`, a plain one gets EOS; a sample
    ending at `<|im_end|>` decodes to text that encodes back to the same ending."""
    tokenizer = tokenizer_of("qwen2", texts(rows))
    tokenizer.eos_token = EOT
    end, eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", EOT])
    assert layout(tokenizer).stops == (eos, end)
    prompt = render_prompt([{"role": "user", "content": USER}], tokenizer)
    completion = render_completion(
        [{"role": "user", "content": USER}],
        [{"role": "assistant", "content": " fine ."}],
        tokenizer,
        "chosen",
    )
    sampled = encode_response(tokenizer, completion)
    assert sampled[-1] == end and eos not in sampled
    assert encode_response(tokenizer, " fine .")[-1] == eos
    for ending in ([end], [eos]):
        body = sampled[:-1] + ending
        text = decoded(tokenizer, encode_prompt(tokenizer, prompt), body)
        assert encode_response(tokenizer, text) == body


def test_a_template_that_writes_bos_gets_no_second_one(rows):
    """Llama-style templates start with `{{ bos_token }}`; the tokenizer's BOS is not added again."""
    tokenizer = build_tokenizer(texts(rows), vocab_size=300)
    tokenizer.chat_template = "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE
    prompt = render_prompt([{"role": "user", "content": USER}], tokenizer)
    assert prompt.startswith("<s>")
    ids = encode_prompt(tokenizer, prompt)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


def test_an_empty_prompt_starts_from_a_token(rows):
    """GPT-2 adds no BOS; an empty prompt starts from `<|endoftext|>` (BOS = EOS), so the first
    response token has something to be predicted from and generation has an input."""
    tokenizer = tokenizer_of("gpt2", texts(rows))
    assert encode_prompt(tokenizer, "") == [tokenizer.eos_token_id]
    assert encode_prompts(tokenizer, ["", USER])[0] == [tokenizer.eos_token_id]


# ---- truncation: never past max_length ------------------------------------------------------------


def test_truncate_with_no_room_for_the_response():
    """The regression: room 0 with an EOS-ended response kept all but the last token."""
    prompt, response = truncate([1, 5, 6], [7, 8, 9, 2], max_length=1, eos_id=2)
    assert len(prompt) + len(response) <= 1
    assert truncate([1, 5], [7, 8, 2], max_length=2, eos_id=[2]) == ([1], [2])


ids = st.lists(st.integers(0, 9), max_size=40)


@settings(max_examples=400, deadline=None)
@given(
    prompt=ids,
    response=ids,
    max_length=st.integers(1, 48),
    head=st.integers(0, 3),
    stops=st.sets(st.integers(0, 9), max_size=2),
)
def test_no_sequence_exceeds_max_length(prompt, response, max_length, head, stops):
    p, r = truncate(prompt, response, max_length, stops, head=head)
    assert len(p) + len(r) <= max_length
    assert p[: min(head, max_length)] == prompt[: min(head, max_length, len(prompt))]
    if len(prompt) + len(response) <= max_length:
        assert (p, r) == (prompt, response)
    cut = len(r) < len(response)
    if cut and r and response[-1] in stops:
        assert r[-1] == response[-1]  # a cut response keeps its stop token
    big_enough = max_length >= min(head, len(prompt)) + 3
    if big_enough and len(prompt) > head and len(response) >= 2 and response[-1] in stops:
        assert len(p) > min(head, len(p)) and len(r) >= 2 and r[-1] == response[-1]


# ---- sft → rm → policy on each layout, explicit and conversational rows ---------------------------


def explicit(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    prefs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    sft = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    return prefs, sft


def conversational(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    def turn(role, text):
        return [{"role": role, "content": text}]

    prefs = [
        {
            "prompt": turn("user", r["prompt"]),
            "chosen": turn("assistant", r["chosen"]),
            "rejected": turn("assistant", r["rejected"]),
        }
        for r in rows
    ]
    sft = [{"messages": turn("user", r["prompt"]) + turn("assistant", r["chosen"])} for r in rows]
    return prefs, sft


FORMATS = {"explicit": explicit, "conversational": conversational}
SMALL_RUN = [
    "sft.max_epochs=1",
    "rm.max_epochs=1",
    "sft.batch_size=16",
    "rm.batch_size=16",
    "policy.steps=2",
    "policy.prompts_per_step=4",
    "policy.eval_samples=4",
    "policy.generation.max_new_tokens=8",
    "algo.group_size=2",
    "callbacks=none",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def user_files(fmt: str, rows: list[dict], directory: Path) -> list[str]:
    prefs, sft = FORMATS[fmt](rows)
    return [
        "data=jsonl",
        f"data.path={write_jsonl(directory / 'prefs.jsonl', prefs)}",
        f"data.sft_path={write_jsonl(directory / 'sft.jsonl', sft)}",
    ]


def overrides(checkpoint: Path, files: list[str], *extra: str) -> list[str]:
    return ["model=hf", f"model.name_or_path={checkpoint}", *files, *SMALL_RUN, *extra]


@pytest.fixture(scope="module", params=[(n, f) for n in LAYOUTS for f in FORMATS], ids="-".join)
def pipeline(request, rows, checkpoints, tmp_path_factory):
    """`python train.py model=hf model.name_or_path=<layout> data=jsonl …` (sft → rm → policy):
    (layout, format, composed config, run context)."""
    name, fmt = request.param
    root = tmp_path_factory.mktemp(f"{name}-{fmt}")
    cfg = compose(overrides(checkpoints[name], user_files(fmt, rows, root)), root)
    run(cfg)
    return name, fmt, cfg, RunContext(cfg)


def artifact(cfg, stage: str) -> Path:
    return Path(cfg.paths.artifacts_dir) / "custom" / stage


def sequences(ctx, cfg) -> list[list[int]]:
    """Every sequence the SFT and RM stages trained and validated on."""
    sft = SFTDataModule(ctx.data, ctx.tokenizer, max_length=cfg.sft.max_length)
    rm = PreferenceDataModule(ctx.data, ctx.tokenizer, max_length=cfg.rm.max_length)
    sft.setup()
    rm.setup()
    out = [x["ids"] for split in sft.datasets.values() for x in split]
    return out + [
        x[k] for split in rm.datasets.values() for x in split for k in ("chosen", "rejected")
    ]


def checkpoint_prefix(folder) -> list[int]:
    """What the checkpoint's own tokenizer puts before a text's tokens."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plain = tokenizer(USER, add_special_tokens=False)["input_ids"]
    full = tokenizer(USER)["input_ids"]
    assert full[len(full) - len(plain) :] == plain
    return full[: len(full) - len(plain)]


def decoded(tokenizer, prompt: list[int], response: list[int]) -> str:
    """`decode_responses` of one sample laid out as `sample` returns it (response then pad)."""
    pad = tokenizer.pad_token_id
    ids = torch.tensor([prompt + response + [pad, pad]])
    mask = torch.tensor([[0] * len(prompt) + [1] * len(response) + [0, 0]])
    return decode_responses(tokenizer, ids, mask)[0]


def test_stages_write_their_artifacts(pipeline):
    _, _, cfg, _ = pipeline
    for stage in ("sft", "rm", "policy"):
        assert (artifact(cfg, stage) / "config.json").exists(), stage


def test_no_sequence_ends_in_two_stop_tokens_and_bos_only_where_the_tokenizer_puts_one(pipeline):
    name, fmt, cfg, ctx = pipeline
    tokenizer = ctx.tokenizer
    prefix, stops = list(layout(tokenizer).prefix), set(stop_token_ids(tokenizer))
    assert prefix == checkpoint_prefix(cfg.model.name_or_path)
    for seq in sequences(ctx, cfg):
        assert seq[-1] in stops and seq[-2] not in stops, tokenizer.decode(seq)
        assert seq[: len(prefix)] == prefix and seq[len(prefix)] not in stops
        if not prefix:  # GPT-2 / Pythia / Qwen2: no BOS at all
            assert seq[0] != tokenizer.bos_token_id
    if fmt == "conversational" and name == "qwen2":  # the template's `<|im_end|>\n`, once
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert all(seq.count(end) == 2 for seq in sequences(ctx, cfg))  # prompt's and reply's


def test_reward_model_scores_a_training_pair_as_it_was_trained(pipeline):
    """LearnedReward (policy time) vs the RM stage's own batch (train time): same ids, same
    score; and a policy sample of the chosen response, decoded to text, encodes to those ids."""
    _, _, cfg, ctx = pipeline
    datamodule = PreferenceDataModule(ctx.data, ctx.tokenizer, max_length=cfg.rm.max_length)
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    records = ctx.data.load("prefs", "val", ctx.tokenizer).records
    reward = LearnedReward(path=str(artifact(cfg, "rm")), max_length=cfg.rm.max_length).setup(ctx)
    order = {tuple(x["chosen"]): i for i, x in enumerate(datamodule.datasets["val"])}
    prompts, chosen = [r.prompt for r in records], [r.chosen for r in records]
    trained = [x["chosen"] for x in datamodule.datasets["val"]]
    assert reward.encode(prompts, chosen) == trained
    model = AutoModelForSequenceClassification.from_pretrained(artifact(cfg, "rm")).eval()
    module = instantiate(cfg.rm.module, reward_model=model)
    with torch.no_grad():
        train_time = module(batch["input_ids"], batch["attention_mask"])  # [2B]
    n = len(batch["margin"])
    rows = [
        order[tuple(ids[m.bool()].tolist())]
        for ids, m in zip(batch["input_ids"][:n], batch["attention_mask"][:n], strict=True)
    ]
    policy_time = reward.raw([prompts[i] for i in rows], [chosen[i] for i in rows])
    torch.testing.assert_close(policy_time, train_time[:n], rtol=0, atol=1e-5)
    for prompt, seq in zip(prompts, trained, strict=True):
        p = encode_prompt(ctx.tokenizer, prompt)
        text = decoded(ctx.tokenizer, p, seq[len(p) :])  # as if the policy had sampled it
        assert reward.encode([prompt], [text]) == [seq]


def test_policy_samples_stop_at_the_first_stop_token(pipeline):
    name, _, cfg, ctx = pipeline
    policy = ctx.model_spec.causal_lm(ctx.tokenizer, path=artifact(cfg, "policy"))
    stops = stop_token_ids(ctx.tokenizer, policy.generation_config)  # kept through sft and policy
    expected = EXPECTED[name][2]
    assert ctx.tokenizer.convert_ids_to_tokens(stops) == expected
    stops = torch.tensor(stops)
    prompts = [r.prompt for r in ctx.data.load("prompts", "train", ctx.tokenizer).records][:8]
    settings_ = GenerationSettings(max_new_tokens=12)
    ids, _, response_mask, ended, width = sample(policy, ctx.tokenizer, prompts, 2, settings_)
    for row, mask, end in zip(ids, response_mask, ended, strict=True):
        response = row[mask.bool()]
        is_stop = torch.isin(response, stops)
        assert int(is_stop.sum()) == int(end) and (not end or bool(is_stop[-1]))
    texts_ = decode_responses(ctx.tokenizer, ids, response_mask)
    reward = LearnedReward(path=str(artifact(cfg, "rm"))).setup(ctx)
    for seq in reward.encode([p for p in prompts for _ in range(2)], texts_):
        assert not (seq[-1] in stops and seq[-2] in stops)


def test_a_reward_model_of_another_family_reads_the_text(rows, checkpoints, tmp_path):
    """Policy on GPT-2, reward model trained on Qwen2: the policy's samples reach the RM as text,
    re-tokenised by the RM's own tokenizer (its own ends and template-free text)."""
    rm_root, policy_root = tmp_path / "qwen2", tmp_path / "gpt2"
    files = user_files("explicit", rows, tmp_path)
    run(compose([*overrides(checkpoints["qwen2"], files), "stage=rm"], rm_root))
    run(compose([*overrides(checkpoints["gpt2"], files), "stage=sft"], policy_root))
    rm_dir = artifact(compose([], rm_root), "rm")
    cfg = compose(
        [*overrides(checkpoints["gpt2"], files), "stage=policy", f"reward.path={rm_dir}"],
        policy_root,
    )
    run(cfg)
    assert (artifact(cfg, "policy") / "config.json").exists()
    ctx = RunContext(cfg)
    reward = LearnedReward(path=str(rm_dir)).setup(ctx)
    assert reward.tokenizer.get_vocab() != ctx.tokenizer.get_vocab()
    assert reward.foreign_stops == (EOT,)
    prompt, response = rows[0]["prompt"], rows[0]["chosen"]
    own = [p + r for p, r in encode_sequences(reward.tokenizer, [prompt], [response], 256)]
    assert reward.encode([prompt], [response]) == own
    assert reward.encode([prompt], [response + EOT]) == own  # the policy's EOS text dropped
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(own)).logits[:, 0]
    torch.testing.assert_close(reward.raw([prompt], [response]), expected, rtol=0, atol=1e-5)


# ---- bad checkpoints and settings: one line at start-up, exit 2, nothing written -------------------

# case -> (train.py arguments, or None: `broken(case)` as model.name_or_path; what the line names).
# A folder without weights and rm/reward.max_length are checked in-process only (below).
BAD = {
    "nonexistent": (["model=hf", "model.name_or_path=/nonexistent"], "/nonexistent"),
    "no_tokenizer": (None, "no tokenizer"),
    "no_tokens": (None, "turns text into no tokens"),
    "small_embeddings": (None, "embeddings"),
    "dtype": (["model.dtype=float17"], "model.dtype"),
    "sft_max_length": (["sft.max_length=1"], "sft.max_length"),
}


@pytest.mark.parametrize("kind", ["no_tokenizer", "no_weights", "no_tokens", "small_embeddings"])
def test_a_broken_checkpoint_is_refused_in_one_line(kind, rows, tmp_path):
    folder = broken(kind, texts(rows), tmp_path / kind)
    with pytest.raises(CheckpointError) as err:
        checkpoint_tokenizer(str(folder))
    message = str(err.value)
    assert message.startswith(f"model.name_or_path={folder}: ") and "\n" not in message
    assert {"no_weights": "no weights"}.get(kind, BAD.get(kind, ("", ""))[1]) in message
    assert "fix: " in message


@pytest.mark.parametrize("key", ["sft.max_length", "rm.max_length", "reward.max_length"])
def test_a_max_length_below_four_fails_at_start_up(key, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(compose([f"{key}=3"], tmp_path))
    assert str(err.value).startswith(f"{key}=3 is invalid: expected an integer >= 4")


def test_a_missing_folder_is_refused_in_one_line():
    with pytest.raises(CheckpointError, match=r"^model.name_or_path=/nonexistent: no such folder"):
        checkpoint_tokenizer("/nonexistent")
    with pytest.raises(ConfigError, match="model.dtype='float17'"):
        ModelSpec(name_or_path="x", dtype="float17")


@pytest.mark.slow  # a subprocess each: imports torch, transformers and lightning afresh (~5 s)
@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_or_setting_fails_at_start_up_with_one_line(case, rows, tmp_path):
    args, named = BAD[case]
    if args is None:
        folder = broken(case, texts(rows), tmp_path / case)
        args = ["model=hf", f"model.name_or_path={folder}"]
    files = user_files("explicit", rows, tmp_path)
    result = train_cli([*args, *files, *SMALL_RUN], tmp_path / "root", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert named in lines[0] and ("fix: " in lines[0] or "expected" in lines[0]), lines[0]
    assert not (tmp_path / "root" / "artifacts").exists()  # nothing written
