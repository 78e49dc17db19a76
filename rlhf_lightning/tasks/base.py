"""What every built-in task provides: generated data files, a tokenizer corpus and a gold reward.

A task writes its data as TRL-format JSONL into one folder, and the framework reads it back through
the same loader that reads a user's files. The gold reward plays the human: the learner never sees
it, only evaluation does.

Files a task writes (`TASK_FILES`):
  sft_{train,val}.jsonl            {"prompt": str, "completion": str}      (TRL prompt-completion)
  prefs_{train,val,test}.jsonl     {"prompt": str, "chosen": str, "rejected": str}  (TRL preference)
  prompts_{train,eval}.jsonl       {"prompt": str}                        (TRL prompt-only)
  card.json                        sizes, labelling temperature, Bayes-optimal accuracy per split, seed
Responses start with a space (" the movie was great ."), so `prompt + response` is the full text.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

TASK_FILES = (
    "sft_train.jsonl",
    "sft_val.jsonl",
    "prefs_train.jsonl",
    "prefs_val.jsonl",
    "prefs_test.jsonl",
    "prompts_train.jsonl",
    "prompts_eval.jsonl",
    "card.json",
)


@runtime_checkable
class Task(Protocol):
    """A built-in task: deterministic by seed, generated offline."""

    name: str

    def write(self, data_dir: Path) -> Path:
        """Write every file of `TASK_FILES` into `data_dir` (created if needed) and return it.

        Idempotent: when the files exist and `card.json` records the same settings, nothing is
        rewritten. Each file is written atomically.
        """

    def corpus(self) -> Iterator[str]:
        """Texts covering the task's vocabulary, to train the offline tokenizer on."""

    def gold_reward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Gold reward of each (prompt, response) pair, shape [B], float32. Never fails on odd text."""

    def card(self) -> dict:
        """Sizes, settings and known ceilings (e.g. `bayes_accuracy` per preference split)."""


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    """Write `rows` as JSON lines to `path` via a temporary file and `os.replace` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write one JSON document atomically (see `write_jsonl_atomic`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_written(data_dir: Path, settings: dict) -> bool:
    """True when all task files exist and the card records exactly `settings`."""
    card = data_dir / "card.json"
    if not all((data_dir / name).exists() for name in TASK_FILES):
        return False
    try:
        return json.loads(card.read_text(encoding="utf-8")).get("settings") == settings
    except (OSError, json.JSONDecodeError):
        return False
