"""Fuzzing the loaders: whatever the bytes, a load returns records or raises DataError."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_lightning.data.records import (
    LoadReport,
    PreferenceRecord,
    implicit_prompt,
    load_preferences,
    load_prompts,
    load_sft,
)
from rlhf_lightning.errors import DataError

LOADERS = (load_preferences, load_sft, load_prompts)
KEYS = ("prompt", "chosen", "rejected", "margin", "id", "messages", "text", "completion")
MESSAGE_KEYS = ("role", "content")
ROLES = ("user", "assistant", "system", "tool", "bot")

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(ROLES)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(KEYS + MESSAGE_KEYS) | st.text(max_size=4), inner, max_size=5
        )
    ),
    max_leaves=20,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES), "content": st.text(max_size=8)},
        optional={"name": scalars},
    ),
    max_size=3,
)
values = st.text(max_size=12) | messages | json_values
optional = {"id": scalars, "extra": scalars}
rows = st.one_of(
    st.fixed_dictionaries(
        {"chosen": values, "rejected": values},
        optional={"prompt": values, "margin": scalars, **optional},
    ),
    st.fixed_dictionaries({"prompt": values, "completion": values}, optional=optional),
    st.fixed_dictionaries({"messages": messages}, optional=optional),
    st.fixed_dictionaries({"text": values}, optional=optional),
    st.fixed_dictionaries({"prompt": values}, optional=optional),
    st.dictionaries(st.sampled_from(KEYS), values, max_size=4),
)


def load_all(name: str, content: bytes) -> None:
    """Every loader, in both modes: a LoadReport or a DataError, nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        for load in LOADERS:
            for on_bad_row in ("error", "skip"):
                try:
                    report = load(path, on_bad_row=on_bad_row, max_chars=40)
                except DataError as error:
                    assert str(error)
                else:
                    assert isinstance(report, LoadReport) and report.records
                    assert on_bad_row == "skip" or not report.skipped


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=40), max_size=5), st.sampled_from(["p.jsonl", "p.json", "p.csv"])
)
def test_arbitrary_bytes(lines, name):
    load_all(name, b"\n".join(lines))


@settings(max_examples=200, deadline=None)
@given(st.lists(rows | json_values, max_size=4), st.booleans())
def test_arbitrary_json_rows(values, as_list):
    if as_list:
        load_all("p.json", json.dumps(values).encode())
    else:
        load_all("p.jsonl", "".join(json.dumps(v) + "\n" for v in values).encode())


texts = st.text(max_size=30)


@settings(max_examples=200, deadline=None)
@given(texts, texts, texts, st.booleans())
def test_valid_text_rows_round_trip_exactly(prompt, chosen, rejected, implicit):
    row = {"chosen": chosen, "rejected": rejected}
    if not implicit:
        row["prompt"] = prompt
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.jsonl"
        path.write_text(json.dumps(row) + "\n", encoding="utf-8")
        try:
            record = load_preferences(path).records[0]
        except DataError as error:
            cut = implicit_prompt(chosen, rejected) if implicit else 0
            blank = not chosen[cut:].strip() or not rejected[cut:].strip()
            assert blank or chosen == rejected, str(error)
            return
    if implicit:  # the prompt is split off the front of both; nothing is lost or changed
        assert record.prompt + record.chosen == chosen
        assert record.prompt + record.rejected == rejected
        assert record.prompt == "" or (record.chosen[0].isspace() and record.rejected[0].isspace())
        assert not record.prompt[-1:].isspace()
    else:
        assert record == PreferenceRecord(prompt, chosen, rejected)
