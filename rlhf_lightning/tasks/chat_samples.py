"""Sampling and caching the pairs of `task=chat`: the checkpoint answers each request twice.

`PairSampler` draws both responses of a pair with `generation.sampling.sample` from random streams
keyed by (seed, SAMPLE_STREAM + split, pair, j), so a pair does not depend on the batch it is drawn
in. `SampleCache` keeps every sampled pair in `<data_dir>/samples/<split>.jsonl`, appended batch by
batch (an interrupted run resumes where it stopped; a larger split only samples its new pairs),
valid while `samples/key.json` — the settings the samples depend on — is unchanged. Another key
(e.g. `task.seed=1`) moves the cache it replaces aside into `samples/<digest of its key>/` rather than
deleting it (its pairs took minutes of sampling each), and moves its own back when it finds it
there: switching settings back and forth samples nothing twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from rlhf_lightning.tasks.base import write_json_atomic
from rlhf_lightning.tasks.chat_judge import strip_markup

PAIR_SPLITS = ("train", "val", "test")
SAMPLE_STREAM = 2**34  # rollout key of the task's samples: apart from every policy rollout


def user(request: str) -> list[dict]:
    """A request as TRL conversational messages."""
    return [{"role": "user", "content": request}]


class PairSampler:
    """The checkpoint and tokenizer, loaded once, drawing keyed pairs of responses."""

    def __init__(self, model_spec, settings: dict):
        from rlhf_lightning.generation.settings import GenerationSettings

        print(
            f"[chat] sampling preference pairs from {model_spec.name_or_path} (cached)", flush=True
        )
        self.tokenizer = model_spec.tokenizer(lambda: iter(()), cache_dir=None)
        self.model = model_spec.causal_lm(self.tokenizer).eval()
        self.seed = settings["seed"]
        self.generation = GenerationSettings(
            max_new_tokens=settings["max_new_tokens"], temperature=settings["sampling_temperature"]
        )

    def __call__(self, split: str, split_number: int, indices: list[int], requests: list[str]):
        from rlhf_lightning.data.chat import render_prompt
        from rlhf_lightning.generation.keyed import sample_seeds
        from rlhf_lightning.generation.sampling import decode_responses, sample

        prompts = [render_prompt(user(r), self.tokenizer) for r in requests]
        seeds = sample_seeds(self.seed, SAMPLE_STREAM + split_number, indices, 2)
        ids, _, response_mask, ended, _ = sample(
            self.model, self.tokenizer, prompts, 2, self.generation, seeds, shared_prefix=True
        )
        texts = decode_responses(self.tokenizer, ids, response_mask)
        return [
            {
                "pair": i,
                "request": r,
                "responses": [strip_markup(t) for t in texts[2 * n : 2 * n + 2]],
                "ended": ended[2 * n : 2 * n + 2].tolist(),
            }
            for n, (i, r) in enumerate(zip(indices, requests, strict=True))
        ]


class SampleCache:
    """`<directory>/<split>.jsonl`: sampled pairs in order, valid while `key.json` matches; the
    caches of other keys wait in `<directory>/<digest(key)>/` (see the module docstring)."""

    def __init__(self, directory: Path, key: dict):
        self.directory, self.key = Path(directory), key

    def load(self) -> dict[str, list[dict]]:
        """The cached pairs of each split (a prefix of pairs 0, 1, …) for this key: the active
        cache if its key matches, else this key's cache moved back from the side (none if never
        sampled), the other key's moved aside first."""
        key_file = self.directory / "key.json"
        current = json.loads(key_file.read_text()) if key_file.exists() else None
        if current != self.key:
            if current is not None:
                self._move(self.directory, self.directory / digest(current))
            else:  # files with no key: nothing says what they hold (an interrupted move)
                for split in PAIR_SPLITS:
                    (self.directory / f"{split}.jsonl").unlink(missing_ok=True)
            self._move(self.directory / digest(self.key), self.directory)
            write_json_atomic(key_file, self.key)
        return {split: self._read(self.directory / f"{split}.jsonl") for split in PAIR_SPLITS}

    @staticmethod
    def _move(source: Path, target: Path) -> None:
        """The split files, then key.json last (a cache counts only once its key is there)."""
        if not source.is_dir():
            return
        target.mkdir(parents=True, exist_ok=True)
        for name in [f"{split}.jsonl" for split in PAIR_SPLITS] + ["key.json"]:
            if (source / name).exists():
                (source / name).replace(target / name)
        if source.parent == target and not any(source.iterdir()):  # a side folder, now empty
            source.rmdir()

    @staticmethod
    def _read(path: Path) -> list[dict]:
        rows = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted append
                    break
                if row.get("pair") != len(rows):
                    break
                rows.append(row)
        return rows

    @staticmethod
    def append(path: Path, rows: list[dict]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def digest(key: dict) -> str:
    """A cache key's folder name: 16 hex digits of the SHA-256 of its sorted JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def chunks(indices: range, size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start : start + size])
