"""Reading users' data files into records: every format, and one clear error for every fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_lightning.data.chat import DEFAULT_CHAT_TEMPLATE, render_prompt
from rlhf_lightning.data.records import (
    LoadReport,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
    implicit_prompt,
    load_preferences,
    load_prompts,
    load_sft,
)
from rlhf_lightning.data.sources import read_rows
from rlhf_lightning.errors import ConfigError, DataError
from rlhf_lightning.tasks.base import write_jsonl_atomic

GOOD = {"prompt": "Q: best film?", "chosen": " the movie was great .", "rejected": " bad ."}
USER = [{"role": "user", "content": "hi"}]
YO = [{"role": "assistant", "content": "yo"}]
NO = [{"role": "assistant", "content": " no"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def line(**row) -> bytes:
    return json.dumps(row).encode() + b"\n"


@pytest.fixture(scope="module")
def tokenizer():
    from rlhf_lightning.models.tokenizer import build_tokenizer

    return build_tokenizer(["hello world the movie was great"], vocab_size=270)


# --- faults: each message names the file, the row and the key fact ------------------------------

GOOD_LINE = json.dumps(GOOD).encode() + b"\n"
FAULTS = [
    # (case, file name, bytes, max_chars, expected where, expected fact)
    ("invalid JSON", "p.jsonl", GOOD_LINE + b'{"prompt": "x",\n', None, "row 2", "not valid JSON"),
    ("not UTF-8", "p.jsonl", GOOD_LINE * 2 + b'{"chosen": "\xff"}\n', None, "row 3", "UTF-8"),
    (
        "missing chosen",
        "p.jsonl",
        line(prompt="p", rejected="r"),
        None,
        "row 1",
        "missing 'chosen'",
    ),
    ("extra field", "p.jsonl", line(**GOOD, score=3), None, "row 1", "unknown field 'score'"),
    (
        "wrong type",
        "p.jsonl",
        line(prompt="p", chosen=3, rejected="r"),
        None,
        "row 1",
        "got a number",
    ),
    (
        "empty chosen",
        "p.jsonl",
        line(prompt="p", chosen=" \n", rejected="r"),
        None,
        "row 1",
        "empty",
    ),
    (
        "chosen == rejected",
        "p.jsonl",
        line(prompt="p", chosen="a", rejected="a"),
        None,
        "row 1",
        "identical",
    ),
    ("margin 'x'", "p.jsonl", line(**GOOD, margin="x"), None, "row 1", "'margin' must be a number"),
    (
        "margin NaN",
        "p.jsonl",
        b'{"chosen": "a", "rejected": "b", "margin": NaN}\n',
        None,
        "row 1",
        "finite",
    ),
    (
        "over max_chars",
        "p.jsonl",
        GOOD_LINE + line(prompt="p" * 40, chosen="c", rejected="r"),
        40,
        "row 2",
        "prompt + chosen has 41 characters, more than max_chars=40",
    ),
    (
        "unpaired surrogate",
        "p.jsonl",
        b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}\n',
        None,
        "row 1",
        "'prompt' holds an unpaired surrogate",
    ),
    (
        "implicit: nothing after the shared prefix",
        "p.jsonl",
        line(chosen="x ", rejected="x  y"),
        None,
        "row 1",
        "'chosen' has no text after the implicit prompt",
    ),
    ("row not an object", "p.jsonl", b'["a", "b"]\n', None, "row 1", "is a list, not an object"),
    (
        "duplicate key",
        "p.jsonl",
        b'{"chosen": "a", "chosen": "b", "rejected": "c"}\n',
        None,
        "row 1",
        "'chosen' twice",
    ),
    (
        "mixed text/messages",
        "p.jsonl",
        line(prompt="p", chosen=YO, rejected="r"),
        None,
        "row 1",
        "must both be strings or both be lists of messages",
    ),
    (
        "text prompt, message responses",
        "p.jsonl",
        line(prompt="p", chosen=YO, rejected=NO),
        None,
        "row 1",
        "'chosen' must be a string, got a list",
    ),
    (
        "unknown role",
        "p.jsonl",
        line(prompt=[{"role": "bot", "content": "x"}], chosen=YO, rejected=NO),
        None,
        "row 1",
        "unknown role 'bot'",
    ),
    (
        "message without content",
        "p.jsonl",
        line(prompt=[{"role": "user"}], chosen=YO, rejected=NO),
        None,
        "row 1",
        "message 0 has no 'content'",
    ),
    (
        "completion not assistant",
        "p.jsonl",
        line(prompt=USER, chosen=USER, rejected=NO),
        None,
        "row 1",
        "must start and end with an assistant message",
    ),
    (
        "JSON list item",
        "p.json",
        b'[{"chosen": "a", "rejected": "b"}, 7]',
        None,
        "index 1",
        "is a number, not an object",
    ),
    (
        "JSON array syntax",
        "p.json",
        b'[{"chosen": "a",\n "rejected": }]',
        None,
        "line 2 column",
        "not valid JSON",
    ),
    (
        "CSV ragged row",
        "p.csv",
        b"prompt,chosen,rejected\np,a,b\np,a\n",
        None,
        "index 1 (line 3)",
        "2 cells but the header has 3 columns",
    ),
    (
        "CSV empty chosen",
        "p.csv",
        b"prompt,chosen,rejected\np,,b\n",
        None,
        "index 0 (line 2)",
        "'chosen' is empty",
    ),
]


@pytest.mark.parametrize(
    "name, content, max_chars, where, fact", [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS]
)
def test_each_fault_names_file_row_and_fact(tmp_path, name, content, max_chars, where, fact):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        load_preferences(path, max_chars=max_chars)
    message = str(error.value)
    assert f"{path}:{where}" in message and fact in message
    assert "fix: " in message and "\n" not in message


@pytest.mark.parametrize(
    "content, fact",
    [
        (b"", "contains no rows"),
        (b"\n  \n", "contains no rows"),
        (json.dumps(GOOD, indent=2).encode(), "holds an object at the top level, not a list"),
        (b'"just a string"', "holds a string at the top level, not a list"),
    ],
)
def test_whole_file_faults(tmp_path, content, fact):
    path = tmp_path / "p.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=fact) as error:
        load_preferences(path)
    assert str(path) in str(error.value)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="does not exist — fix: check the path"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="nope/prefs.jsonl: does not exist"):
        load_preferences("nope/prefs.jsonl")  # looks like owner/name, but has a file suffix
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_preferences(tmp_path / "p.txt")


def test_hub_name_offline_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"nobody-xyz/none: could not be loaded as a Hugging Face"):
        load_preferences("nobody-xyz/none")


def test_skip_mode_counts_every_bad_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        GOOD_LINE
        + b"{oops\n"
        + b"\xfe\n"
        + line(prompt="p", rejected="r")
        + line(**GOOD, extra=1)
        + line(prompt="p", chosen="a", rejected="a")
        + line(**GOOD, margin="x")
        + line(prompt="p" * 50, chosen="c", rejected="r")
        + GOOD_LINE
    )
    report = load_preferences(path, on_bad_row="skip", max_chars=40)
    assert report.records == [PreferenceRecord(**GOOD)] * 2
    assert [where for where, _ in report.skipped] == [f"{path}:row {i}" for i in range(2, 9)]
    assert (
        "skipped 7 bad rows (first: " in report.summary() and "not valid JSON" in report.summary()
    )


def test_skip_mode_with_no_good_row_fails_and_bad_mode_is_config_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}, {"chosen": 1, "rejected": "r"}])
    with pytest.raises(DataError, match="every row is bad \\(2 skipped; first: "):
        load_preferences(path, on_bad_row="skip")
    with pytest.raises(ConfigError, match="on_bad_row must be 'error' or 'skip', got 'ignore'"):
        load_preferences(path, on_bad_row="ignore")


# --- valid formats ------------------------------------------------------------------------------


def test_explicit_round_trips_exactly_with_margin_and_id(tmp_path):
    rows = [
        {**GOOD, "margin": 2},
        {"id": 7, "prompt": "", "chosen": "  two spaces\n", "rejected": "\ttab", "margin": None},
        {"prompt": "Ünïcode ✓", "chosen": " 🙂", "rejected": " \u00a0x"},
    ]
    records = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows)).records
    assert records == [
        PreferenceRecord(GOOD["prompt"], GOOD["chosen"], GOOD["rejected"], 2.0),
        PreferenceRecord("", "  two spaces\n", "\ttab", None),
        PreferenceRecord("Ünïcode ✓", " 🙂", " \u00a0x"),
    ]


def test_task_files_read_back_exactly(tmp_path):
    rows = [{"prompt": "the movie", "chosen": " was great .", "rejected": " was bad ."}]
    write_jsonl_atomic(tmp_path / "prefs_train.jsonl", rows)
    assert load_preferences(tmp_path / "prefs_train.jsonl").records == [PreferenceRecord(**rows[0])]


@pytest.mark.parametrize(
    "chosen, rejected, prompt",
    [
        ("A: so good", "A: so bad", "A: so"),  # common prefix "A: so " -> cut before the space
        ("The cat sat", "The car sat", "The"),  # prefix ends inside a word -> back to its start
        ("a b", "a b c", "a"),  # one is a prefix of the other: both keep some text
        ("x  y", "x  z", "x"),  # the whole whitespace run goes to the completions
        ("good", "bad", ""),  # nothing shared
        ("same start", "same_start", ""),  # shared text without whitespace
    ],
)
def test_implicit_prompt_cut_at_word_boundary(tmp_path, chosen, rejected, prompt):
    assert chosen[: implicit_prompt(chosen, rejected)] == prompt
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": chosen, "rejected": rejected}])
    record = load_preferences(path).records[0]
    assert record == PreferenceRecord(prompt, chosen[len(prompt) :], rejected[len(prompt) :])


def test_conversational_without_template_uses_default(tmp_path, tokenizer):
    row = {"prompt": USER, "chosen": YO, "rejected": NO}
    expected = PreferenceRecord("<|user|>\nhi\n<|assistant|>\n", "yo", " no")
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    assert load_preferences(path).records == [expected]
    assert load_preferences(path, tokenizer=tokenizer).records == [expected]  # no chat_template


def test_default_template_is_a_real_chat_template(tokenizer):
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    try:
        for messages in (USER, USER + YO + USER, [{"role": "system", "content": "s"}] + USER):
            for generation in (True, False):
                ours = render_prompt(messages) if generation else None
                theirs = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=generation
                )
                assert ours is None or ours == theirs
        assert render_prompt(USER) == "<|user|>\nhi\n<|assistant|>\n"
    finally:
        tokenizer.chat_template = None


def test_conversational_with_tokenizer_template(tmp_path, tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        explicit = {"prompt": USER, "chosen": YO, "rejected": NO}
        implicit = {"chosen": USER + YO, "rejected": USER + NO}
        path = write_jsonl(tmp_path / "p.jsonl", [explicit, implicit])
        expected = PreferenceRecord("<user>hi</s><assistant>", "yo</s>", " no</s>")
        assert load_preferences(path, tokenizer=tokenizer).records == [expected, expected]
        tokenizer.chat_template = (
            "{{ messages | length }}:{% for m in messages %}{{ m['content'] }}"
        )
        tokenizer.chat_template += "{% endfor %}"
        with pytest.raises(DataError, match="row 1: the chat template renders the prompt"):
            load_preferences(path, tokenizer=tokenizer)
    finally:
        tokenizer.chat_template = None


def test_implicit_conversational_multi_turn(tmp_path):
    history = USER + YO + [{"role": "user", "content": "and?"}]
    row = {"chosen": history + YO, "rejected": history + NO}
    record = load_preferences(write_jsonl(tmp_path / "p.jsonl", [row])).records[0]
    assert record.prompt == "<|user|>\nhi\n<|assistant|>\nyo\n<|user|>\nand?\n<|assistant|>\n"
    assert (record.chosen, record.rejected) == ("yo", " no")


def test_json_list_parquet_csv_and_saved_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [
        {**GOOD, "margin": 0.5},
        {"prompt": 'a, "quoted"', "chosen": " x\ny", "rejected": " NA", "margin": None},
    ]
    expected = [PreferenceRecord(**row) for row in rows]
    (tmp_path / "p.json").write_text(json.dumps(rows, indent=2))
    dataset = Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "p.parquet"))
    dataset.to_csv(str(tmp_path / "p.csv"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": dataset.select([0]), "test": dataset}).save_to_disk(str(tmp_path / "dd"))
    for name in ("p.json", "p.parquet", "p.csv", "saved"):
        assert load_preferences(tmp_path / name).records == expected, name
    assert load_preferences(tmp_path / "dd", split="test").records == expected
    assert load_preferences(tmp_path / "dd").records == expected[:1]
    with pytest.raises(DataError, match=r"has no split 'val' \(splits: train, test\)"):
        load_preferences(tmp_path / "dd", split="val")
    wheres = [where for where, _ in read_rows(tmp_path / "p.csv")]
    assert wheres == [
        f"{tmp_path / 'p.csv'}:index 0 (line 2)",
        f"{tmp_path / 'p.csv'}:index 1 (line 3)",
    ]


def test_folder_of_files_picks_the_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    write_jsonl(tmp_path / "val.jsonl", [{**GOOD, "rejected": " meh"}])
    (tmp_path / "card.json").write_text("{}")
    assert load_preferences(tmp_path).records == [PreferenceRecord(**GOOD)]
    assert load_preferences(tmp_path, split="validation").records[0].rejected == " meh"
    with pytest.raises(DataError, match="has no file for split 'test'"):
        load_preferences(tmp_path, split="test")


def test_sft_formats(tmp_path):
    rows = [
        {"prompt": "Q:", "completion": " A ."},
        {"messages": USER + YO},
        {"text": " whole text"},
        {"prompt": USER, "completion": NO},
    ]
    records = load_sft(write_jsonl(tmp_path / "s.jsonl", rows)).records
    chat = "<|user|>\nhi\n<|assistant|>\n"
    assert records == [
        SFTRecord("Q:", " A ."),
        SFTRecord(chat, "yo"),
        SFTRecord("", " whole text"),
        SFTRecord(chat, " no"),
    ]
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": USER}])
    with pytest.raises(DataError, match="row 1: 'messages' must end with an assistant message"):
        load_sft(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "text": "t"}])
    with pytest.raises(DataError, match=r"row 1: missing 'completion' \(fields found: 'prompt'"):
        load_sft(tmp_path / "bad.jsonl")


def test_prompt_formats(tmp_path):
    rows = [{"prompt": "the movie"}, {"prompt": USER, "id": "a"}, {"prompt": ""}]
    report = load_prompts(write_jsonl(tmp_path / "q.jsonl", rows))
    assert isinstance(report, LoadReport) and report.skipped == []
    assert report.summary() == f"3 records from {tmp_path / 'q.jsonl'}"
    assert report.records == [
        PromptRecord("the movie"),
        PromptRecord("<|user|>\nhi\n<|assistant|>\n"),
        PromptRecord(""),
    ]
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x" * 11}])
    with pytest.raises(DataError, match="prompt has 11 characters, more than max_chars=10"):
        load_prompts(tmp_path / "q.jsonl", max_chars=10)
