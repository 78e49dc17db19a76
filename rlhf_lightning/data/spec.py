"""Where a run's data comes from: a built-in task's generated files, or the user's own files.

Both kinds answer the same questions (preference pairs, SFT demonstrations, prompts per split, a
corpus for the offline tokenizer), and both read through the same loader in `records.py`, so a
built-in task exercises exactly the path a user's file takes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from rlhf_lightning.data.records import LoadReport, load_preferences, load_prompts, load_sft
from rlhf_lightning.errors import DataError
from rlhf_lightning.tasks.base import Task

_LOADERS = {"prefs": load_preferences, "sft": load_sft, "prompts": load_prompts}


def rendering(tokenizer) -> tuple | None:
    """What decides how a conversational row renders: the tokenizer's chat template and the
    special tokens a template may write (None: no tokenizer, the default template)."""
    if tokenizer is None:
        return None
    names = ("chat_template", "bos_token", "eos_token")
    return tuple(str(getattr(tokenizer, name, None)) for name in names)


class DataSpec:
    """Common interface: `load(kind, split)` with kind in prefs|sft|prompts."""

    name: str = "custom"
    task: Task | None = None

    def __init__(self, on_bad_row: str = "error", max_chars: int | None = None):
        self.on_bad_row = on_bad_row
        self.max_chars = max_chars
        self._cache: dict[tuple, LoadReport] = {}
        self._reported: set[tuple[str, str]] = set()

    def load(self, kind: str, split: str, tokenizer=None) -> LoadReport:
        """The rows of `kind` for `split`; conversational rows rendered with `tokenizer`'s chat
        template (None: `data.chat.DEFAULT_CHAT_TEMPLATE`). Cached per rendering, so rows read
        once without a tokenizer are never handed to a caller that passes one."""
        key = (kind, split, rendering(tokenizer))
        if key not in self._cache:
            self._cache[key] = self._load(kind, split, tokenizer)
            if self._cache[key].skipped and (kind, split) not in self._reported:
                self._reported.add((kind, split))  # said once, whichever rendering read it first
                print(f"[data] {self._cache[key].summary()}")
        return self._cache[key]

    def _load(self, kind: str, split: str, tokenizer) -> LoadReport:
        raise NotImplementedError

    def _read(self, kind: str, source: str | Path, tokenizer, split: str = "train") -> LoadReport:
        return _LOADERS[kind](
            source,
            split=split,
            tokenizer=tokenizer,
            on_bad_row=self.on_bad_row,
            max_chars=self.max_chars,
        )

    def corpus(self) -> Iterator[str]:
        """Texts to train the offline tokenizer on."""
        raise NotImplementedError

    def bayes_accuracy(self, split: str) -> float | None:
        return None


class TaskData(DataSpec):
    """A built-in task: generated into `data_dir/<task>` (once), then read back as files."""

    def __init__(self, task: Task, data_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.task = task
        self.name = task.name
        self.directory = Path(data_dir) / task.name
        self._written = False

    def _files(self) -> Path:
        if not self._written:
            self.task.write(self.directory)
            self._written = True
        return self.directory

    def _load(self, kind: str, split: str, tokenizer) -> LoadReport:
        return self._read(kind, self._files() / f"{kind}_{split}.jsonl", tokenizer)

    def corpus(self) -> Iterator[str]:
        return self.task.corpus()

    def bayes_accuracy(self, split: str) -> float | None:
        card = json.loads((self._files() / "card.json").read_text())
        return card.get("bayes_accuracy", {}).get(split)


class FileData(DataSpec):
    """The user's files (JSONL/JSON/Parquet/CSV or a Hub dataset name) in TRL formats.

    path: preference pairs. val_path: held-out pairs; when absent, `val_fraction` of `path` is held
    out (a fixed shuffle by `seed`). sft_path / prompts_path: for the SFT and policy stages; when
    `prompts_path` is absent the prompts of the preference pairs are used.
    """

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        val_fraction: float = 0.1,
        sft_path: str | None = None,
        prompts_path: str | None = None,
        name: str = "custom",
        split: str = "train",
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.path, self.val_path, self.val_fraction = path, val_path, val_fraction
        self.sft_path, self.prompts_path = sft_path, prompts_path
        self.name, self.split, self.seed = name, split, seed

    def _load(self, kind: str, split: str, tokenizer) -> LoadReport:
        if kind == "prefs":
            return self._preferences(split, tokenizer)
        source = self.sft_path if kind == "sft" else self.prompts_path
        if source is None and kind == "prompts":
            prompts = _unique_prompts(self.load("prefs", "train", tokenizer))
            held = _unique_prompts(self.load("prefs", "val", tokenizer))
            rows = prompts if split == "train" else held
            return LoadReport(records=rows, skipped=[])
        if source is None:
            raise DataError(
                f"the {kind} stage needs data but data.{kind}_path is not set",
                fix=f"add data.{kind}_path=<file> (TRL prompt/completion or messages rows)",
            )
        report = self._read(kind, source, tokenizer, self.split)
        return _split_report(report, split, self.val_fraction, self.seed)

    def _preferences(self, split: str, tokenizer) -> LoadReport:
        if self.val_path is not None:
            source = self.path if split == "train" else self.val_path
            return self._read("prefs", source, tokenizer, self.split)
        full = self._read("prefs", self.path, tokenizer, self.split)
        return _split_report(full, split, self.val_fraction, self.seed)

    def corpus(self) -> Iterator[str]:
        for kind in ("prefs", "sft"):
            if kind == "sft" and self.sft_path is None:
                continue
            for split in ("train", "val"):
                for record in self.load(kind, split).records:
                    yield from (v for v in vars(record).values() if isinstance(v, str))


def _split_report(report: LoadReport, split: str, fraction: float, seed: int) -> LoadReport:
    order = list(range(len(report.records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(order))) if len(order) > 1 else 0
    keep = order[:n_val] if split != "train" else order[n_val:]
    records = [report.records[i] for i in sorted(keep)]
    return LoadReport(records=records, skipped=report.skipped if split == "train" else [])


def _unique_prompts(report: LoadReport) -> list:
    from rlhf_lightning.data.records import PromptRecord

    seen = dict.fromkeys(r.prompt for r in report.records)
    return [PromptRecord(prompt=p) for p in seen]
