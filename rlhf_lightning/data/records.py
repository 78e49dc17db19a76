"""Preference, SFT and prompt records from a user's rows, in TRL's dataset formats.

Formats (https://huggingface.co/docs/trl/dataset_formats):
  preference   {"prompt", "chosen", "rejected"} (+ optional "margin": a finite number or null)
               implicit prompt: {"chosen", "rejected"} only. The prompt is their longest common
               prefix cut back to the start of its last whitespace run, so the prompt ends at a
               word and each completion starts with whitespace (" great .", as the built-in tasks
               write them): "A: so good" / "A: so bad" -> "A: so", " good", " bad". Without
               whitespace in the common prefix the prompt is "".
  SFT          {"prompt", "completion"}; {"messages"} (the last message is the assistant's
               completion, the turns before it the prompt); {"text"} (prompt "", completion text)
  prompts      {"prompt"}
Any prompt/completion may instead be a list of chat messages (conversational formats, rendered to
text by `chat.py`); the implicit conversational preference format shares its leading turns.

Size (over ~300 lines): the three record kinds share one loader (`_load`) and one set of field,
text and length checks; they are kept together so every format fails with the same messages.

Validation: every row is an object with exactly the fields of its format. "id" is accepted and
ignored (exported datasets often carry one); any other field is an error naming it, because a
misspelt column would otherwise vanish unnoticed. Texts are kept exactly as given (no stripping).
Chosen, rejected and completions must hold non-whitespace text; a prompt may be empty. In CSV,
cells are text, so "margin" may also be a string holding a number ("" means no margin).

on_bad_row="error" raises DataError at the first bad row ("file:row 3: missing 'chosen' — fix:
..."); "skip" leaves the row out and lists (where, reason) in `LoadReport.skipped`. A load that
keeps no record raises DataError either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_lightning.data.chat import (
    parse_completion_messages,
    parse_messages,
    render_completion,
    render_prompt,
    split_shared_turns,
)
from rlhf_lightning.data.sources import RowError, json_type, read_rows
from rlhf_lightning.errors import ConfigError, DataError

IGNORED_FIELDS = ("id",)
ON_BAD_ROW = ("error", "skip")
_FIELDS = ("chosen", "rejected")


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass(frozen=True)
class SFTRecord:
    prompt: str
    completion: str


@dataclass(frozen=True)
class PromptRecord:
    prompt: str


@dataclass
class LoadReport:
    """The records read from a source, and every row left out with the reason."""

    records: list
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""

    def summary(self) -> str:
        """One line: how many records were read, how many rows skipped and the first reason."""
        line = f"{len(self.records)} records" + (f" from {self.source}" if self.source else "")
        if self.skipped:
            where, reason = self.skipped[0]
            line += f"; skipped {len(self.skipped)} bad rows (first: {where}: {reason})"
        return line


def load_preferences(
    source: str | Path,
    split: str = "train",
    tokenizer=None,
    on_bad_row: str = "error",
    max_chars: int | None = None,
) -> LoadReport:
    """Preference pairs (`PreferenceRecord`) from `source`; formats in the module docstring."""
    return _load(source, split, parse_preference, tokenizer, on_bad_row, max_chars)


def load_sft(
    source: str | Path,
    split: str = "train",
    tokenizer=None,
    on_bad_row: str = "error",
    max_chars: int | None = None,
) -> LoadReport:
    """Demonstrations (`SFTRecord`) from `source`."""
    return _load(source, split, parse_sft, tokenizer, on_bad_row, max_chars)


def load_prompts(
    source: str | Path,
    split: str = "train",
    tokenizer=None,
    on_bad_row: str = "error",
    max_chars: int | None = None,
) -> LoadReport:
    """Prompts (`PromptRecord`) from `source`."""
    return _load(source, split, parse_prompt, tokenizer, on_bad_row, max_chars)


def _load(source, split, parse: Callable, tokenizer, on_bad_row, max_chars) -> LoadReport:
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int)):
        raise ConfigError(f"max_chars must be a positive integer or null, got {max_chars!r}")
    if max_chars is not None and max_chars <= 0:
        raise ConfigError(f"max_chars must be a positive integer or null, got {max_chars!r}")
    records, skipped = [], []
    for where, row in read_rows(source, split, bad_rows="yield"):
        try:
            if isinstance(row, RowError):
                raise row
            record = parse(row, tokenizer)
            _check_texts(record, max_chars)
        except RowError as e:
            if on_bad_row == "error":
                raise DataError(e.what, where, e.fix) from None
            skipped.append((where, e.what))
            continue
        records.append(record)
    if not records:
        raise DataError(
            f"every row is bad ({len(skipped)} skipped; first: {skipped[0][0]}: {skipped[0][1]})",
            str(source),
            "fix the rows; run with on_bad_row=error to see each one with its fix",
        )
    return LoadReport(records, skipped, str(source))


def parse_preference(row: object, tokenizer=None) -> PreferenceRecord:
    """One preference row -> record; raises RowError naming what is wrong."""
    _check_fields(row, ("chosen", "rejected"), ("prompt", "margin"))
    margin = _margin(row.get("margin"))
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" not in row:
        prompt, chosen, rejected = _implicit(chosen, rejected, tokenizer)
    elif isinstance(row["prompt"], list):
        messages = parse_messages(row["prompt"], "prompt")
        completions = [parse_completion_messages(v, f) for v, f in _pair(chosen, rejected)]
        prompt = render_prompt(messages, tokenizer)
        chosen, rejected = (
            render_completion(messages, c, tokenizer, f, prompt)
            for c, f in zip(completions, _FIELDS, strict=True)
        )
    else:
        prompt = _text(row["prompt"], "prompt", allow_empty=True)
        chosen, rejected = (_text(v, f) for v, f in _pair(chosen, rejected))
    if chosen == rejected:
        raise RowError(
            "'chosen' and 'rejected' are identical",
            "a preference pair needs two different responses; remove the row",
        )
    return PreferenceRecord(prompt, chosen, rejected, margin)


def parse_sft(row: object, tokenizer=None) -> SFTRecord:
    """One SFT row ({prompt, completion} | {messages} | {text}) -> record."""
    if isinstance(row, dict) and "messages" in row:
        _check_fields(row, ("messages",), ())
        messages = parse_messages(row["messages"], "messages")
        cut = len(messages) - 1
        if messages[cut]["role"] != "assistant" or cut == 0:
            raise RowError(
                "'messages' must end with an assistant message that follows at least one turn",
                'write [{"role": "user", ...}, {"role": "assistant", ...}]',
            )
        prompt, completion = messages[:cut], parse_completion_messages(messages[cut:], "messages")
        return _chat_sft(prompt, completion, tokenizer)
    if isinstance(row, dict) and "text" in row and not {"prompt", "completion"} & row.keys():
        _check_fields(row, ("text",), ())
        return SFTRecord("", _text(row["text"], "text"))
    _check_fields(row, ("prompt", "completion"), ())
    if isinstance(row["prompt"], list):
        prompt = parse_messages(row["prompt"], "prompt")
        completion = parse_completion_messages(row["completion"], "completion")
        return _chat_sft(prompt, completion, tokenizer)
    prompt = _text(row["prompt"], "prompt", allow_empty=True)
    return SFTRecord(prompt, _text(row["completion"], "completion"))


def _chat_sft(prompt: list[dict], completion: list[dict], tokenizer) -> SFTRecord:
    text = render_prompt(prompt, tokenizer)
    return SFTRecord(text, render_completion(prompt, completion, tokenizer, "completion", text))


def parse_prompt(row: object, tokenizer=None) -> PromptRecord:
    """One prompt-only row ({prompt}: text or messages) -> record."""
    _check_fields(row, ("prompt",), ())
    if isinstance(row["prompt"], list):
        return PromptRecord(render_prompt(parse_messages(row["prompt"], "prompt"), tokenizer))
    return PromptRecord(_text(row["prompt"], "prompt", allow_empty=True))


def implicit_prompt(chosen: str, rejected: str) -> int:
    """Length of the implicit prompt: the common prefix cut back to its last whitespace run."""
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    cut = common
    while cut > 0 and not chosen[cut - 1].isspace():
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    return cut


def _implicit(chosen: object, rejected: object, tokenizer) -> tuple[str, str, str]:
    if isinstance(chosen, list) and isinstance(rejected, list):
        conversations = [parse_messages(v, f) for v, f in _pair(chosen, rejected)]
        prompt, *completions = split_shared_turns(*conversations)
        for messages, name in zip(completions, _FIELDS, strict=True):
            parse_completion_messages(messages, name)
        text = render_prompt(prompt, tokenizer)
        chosen, rejected = (
            render_completion(prompt, c, tokenizer, f, text)
            for c, f in zip(completions, _FIELDS, strict=True)
        )
        return text, chosen, rejected
    chosen, rejected = (_text(v, f) for v, f in _pair(chosen, rejected))
    cut = implicit_prompt(chosen, rejected)
    prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    for text, name in zip((chosen, rejected), _FIELDS, strict=True):
        if not text.strip():
            raise RowError(
                f"'{name}' has no text after the implicit prompt (the prefix both responses share)",
                "add an explicit 'prompt' field, or remove the row",
            )
    return prompt, chosen, rejected


def _pair(chosen: object, rejected: object) -> list[tuple[object, str]]:
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise RowError(
            "'chosen' and 'rejected' must both be strings or both be lists of messages",
            "give both responses in the same form",
        )
    return [(chosen, "chosen"), (rejected, "rejected")]


def _check_fields(row: object, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    if not isinstance(row, dict):
        example = "{" + ", ".join(f'"{name}": ...' for name in required) + "}"
        raise RowError(f"is {json_type(row)}, not an object", f"write each row as {example}")
    allowed = (*required, *optional)
    missing = [name for name in required if name not in row]
    if missing:
        found = ", ".join(map(repr, row)) or "none"
        optional_note = f" (optional: {_quoted(optional)})" if optional else ""
        raise RowError(
            f"missing {_quoted(missing)} (fields found: {found})",
            f"every row needs {_quoted(required)}{optional_note}",
        )
    unknown = [name for name in row if name not in allowed and name not in IGNORED_FIELDS]
    if unknown:
        raise RowError(
            f"unknown field{'s' * (len(unknown) > 1)} {_quoted(unknown)}",
            f"remove or rename {'them' if len(unknown) > 1 else 'it'}: the fields are "
            f"{_quoted(allowed)} ('id' is ignored)",
        )


def _quoted(names) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _text(value: object, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError(
            f"'{name}' must be a string, got {json_type(value)}",
            f"write '{name}' as text (or every text field as a list of chat messages)",
        )
    if not allow_empty and not value.strip():
        raise RowError(f"'{name}' is empty", f"give '{name}' some text, or remove the row")
    return value


def _margin(value: object) -> float | None:
    """An optional margin: a finite number (or, from CSV, a string holding one)."""
    fix = "set 'margin' to a finite number, or leave it out"
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RowError(f"'margin' must be a number, got {json_type(value)}", fix)
    try:
        margin = float(value)
    except (ValueError, OverflowError):
        raise RowError(f"'margin' must be a number, got {value!r}", fix) from None
    if not math.isfinite(margin):
        raise RowError(f"'margin' must be finite, got {value!r}", fix)
    return margin


def _check_texts(record, max_chars: int | None) -> None:
    """Every text encodes as UTF-8 and, with max_chars, each prompt + response fits in it."""
    for name, text in vars(record).items():
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RowError(
                    f"'{name}' holds an unpaired surrogate at character {e.start}",
                    "fix the text (a lone \\uD800-\\uDFFF escape is not a character)",
                ) from None
    if max_chars is None:
        return
    prompt = getattr(record, "prompt", "")
    for name in ("chosen", "rejected", "completion"):
        if hasattr(record, name) and len(prompt) + len(getattr(record, name)) > max_chars:
            _too_long(f"prompt + {name}", len(prompt) + len(getattr(record, name)), max_chars)
    if isinstance(record, PromptRecord) and len(prompt) > max_chars:
        _too_long("prompt", len(prompt), max_chars)


def _too_long(name: str, length: int, max_chars: int) -> None:
    raise RowError(
        f"{name} has {length} characters, more than max_chars={max_chars}",
        "shorten the text, raise max_chars, or set on_bad_row=skip to leave such rows out",
    )
