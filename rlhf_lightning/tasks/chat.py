"""The built-in task for chat checkpoints: its own samples, labelled by an independent gold judge.

Gao et al.'s synthetic-gold setting (https://arxiv.org/abs/2210.10760) on a real model. Requests
come from templates (`chat_prompts`, 470 distinct, each asking for something warm: a glowing
review, a thank-you note, a cheerful message); `n_prompts_eval` of them are held out from every
file but `prompts_eval`. Each preference pair is two responses the checkpoint itself samples for
one training request — `modules/rollout.sample` with streams keyed by (seed, split, pair, j), at
`sampling_temperature` and `max_new_tokens`, so a pair does not depend on the batch it was drawn
in — labelled by sampling Bradley–Terry under the gold judge g (`chat_judge`) at temperature τ:

    P(y₁ ≻ y₂) = σ((g(y₁) − g(y₂)) / τ),    Bayes accuracy = mean σ(|g₁ − g₂| / τ)

(Bradley & Terry 1952; Christiano et al. 2017). Pairs whose responses are equal or empty are
left out (the loader refuses them) and counted in card.json.

Sampling takes minutes (≈1–2.5 samples/s for 135M parameters on 2 CPU cores), so sampled pairs
are cached and resumed (`chat_samples`). The files are TRL conversational JSONL (messages), read
back through the user-data loader, which renders them with the checkpoint's chat template. SFT
demonstrations are the chosen responses (an instruction-tuned checkpoint needs no SFT stage:
`policy.reference=checkpoint`).

The task samples from the run's own model (`task.model: ${model}`): the checkpoint whose
responses the reward model learns to rank is the policy's reference.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.tasks import chat_judge as judge
from rlhf_lightning.tasks.base import is_written, write_json_atomic, write_jsonl_atomic
from rlhf_lightning.tasks.chat_prompts import all_requests, subject_keyword
from rlhf_lightning.tasks.chat_samples import (
    PAIR_SPLITS,
    PairSampler,
    SampleCache,
    chunks,
    user,
)

DESCRIPTION = (
    "Chat requests from templates (reviews, postcards, thank-you notes, encouragement; each asks "
    "for something warm), answered twice by the checkpoint itself. Gold judge: 2·VADER compound "
    "sentiment + 0.5 if the subject is named − 1 if no sentence end − 3·repeated-trigram share − "
    "a Flesch-reading-ease penalty below 20 − penalties under 4 and over 100 words, clipped to "
    "[-4, 3]. Pairs are labelled by sampling Bradley-Terry under gold at the recorded temperature."
)


class ChatTask:
    """Preference data sampled from a chat checkpoint and labelled by a gold judge.

    Args:
        model: the run's `ModelSpec` (`${model}`): the checkpoint that samples the responses.
        seed: seeds the request split, the sample streams and the labels.
        n_pairs_train, n_pairs_val, n_pairs_test: pairs sampled per split (a few may be left out).
        n_prompts_eval: requests held out for evaluation (`prompts_eval`), in no other file.
        temperature: τ of the Bradley–Terry labels (smaller τ → cleaner labels).
        max_new_tokens, sampling_temperature: how the checkpoint samples; set the policy stage's
            `policy.generation` to the same, so the reward model learns on the reference's samples.
        batch_size: pairs per `generate` call (speed and memory only).
    """

    name = "chat"

    def __init__(
        self,
        model,
        seed: int = 0,
        n_pairs_train: int = 1000,
        n_pairs_val: int = 250,
        n_pairs_test: int = 250,
        n_prompts_eval: int = 64,
        temperature: float = 0.3,
        max_new_tokens: int = 48,
        sampling_temperature: float = 0.7,
        batch_size: int = 16,
    ):
        self.model_spec = model
        self.batch_size = batch_size
        self.settings = {
            "seed": seed,
            "n_pairs_train": n_pairs_train,
            "n_pairs_val": n_pairs_val,
            "n_pairs_test": n_pairs_test,
            "n_prompts_eval": n_prompts_eval,
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "sampling_temperature": sampling_temperature,
            "model": None if model is None else model.name_or_path,
            "dtype": None if model is None else model.dtype,
        }
        _check_settings(self.settings, batch_size)
        requests = list(all_requests())
        random.Random(f"{seed}/requests").shuffle(requests)
        self.eval_requests = [r for r, _ in requests[:n_prompts_eval]]
        self.train_requests = [r for r, _ in requests[n_prompts_eval:]]
        self._written: Path | None = None  # the folder of the last `write`

    def write(self, data_dir: Path) -> Path:
        """Sample (or reuse) the pairs, label them and write every task file into `data_dir`."""
        data_dir = Path(data_dir)
        if is_written(data_dir, self.settings):
            self._written = data_dir
            return data_dir
        self._checkpoint_or_fail()
        (data_dir / "card.json").unlink(missing_ok=True)  # never a half-rewritten folder
        cached = SampleCache(data_dir / "samples", self._sample_key()).load()
        pairs = {s: rows[: self.settings[f"n_pairs_{s}"]] for s, rows in cached.items()}
        pairs = self._sample_missing(pairs, data_dir / "samples")
        data = self._files(pairs)
        for file_name, rows in data.items():
            if file_name != "card.json":
                write_jsonl_atomic(data_dir / file_name, rows)
        write_json_atomic(data_dir / "card.json", data["card.json"])
        self._written = data_dir
        return data_dir

    def corpus(self) -> Iterator[str]:
        """Never called for a pretrained checkpoint (its tokenizer is its own); `model=tiny` has
        no chat checkpoint to sample from, so it fails here with the fix."""
        self._checkpoint_or_fail()
        for request, _ in all_requests():
            yield request

    def gold_reward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Gold g of each (prompt, response), shape [B], float32 (`chat_judge`; the prompt gives
        the subject keyword when it holds one of the task's requests)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        keywords = [subject_keyword(p) for p in prompts]
        return torch.tensor(judge.scores(responses, keywords), dtype=torch.float32)

    def gold_terms(
        self, prompts: Sequence[str], responses: Sequence[str]
    ) -> dict[str, list[float]]:
        """Each weighted term of gold per (prompt, response), before the clip
        (`chat_judge.contributions`): `eval.py mode=rm` reports accuracy on the pairs each term
        decides."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [judge.contributions(r, subject_keyword(p)) for p, r in zip(prompts, responses)]
        return {name: [row[name] for row in rows] for name in rows[0]} if rows else {}

    def well_formed(self, responses: Sequence[str]) -> list[bool]:
        """No degeneracy term of the judge fires (`chat_judge.well_formed`); `eval.py mode=rm`
        reports accuracy on pairs of such responses and on the others apart."""
        return [judge.well_formed(r) for r in responses]

    def card(self) -> dict:
        """Settings, sizes, τ, Bayes accuracy per split and the reference samples' gold: the
        card.json of the last `write` (the card needs the samples, so `write` comes first)."""
        if self._written is None:
            raise RuntimeError("ChatTask.card() needs the samples: call write(data_dir) first")
        return json.loads((self._written / "card.json").read_text(encoding="utf-8"))

    # ---- helpers ------------------------------------------------------------------------------

    def _checkpoint_or_fail(self) -> None:
        if self.model_spec is None or self.model_spec.is_tiny:
            raise ConfigError(
                "task=chat samples its responses from a pretrained chat checkpoint, and "
                "model=tiny is none: use model=smollm2 (or model=hf model.name_or_path=<chat model>)"
            )

    def _sample_key(self) -> dict:
        keys = (
            "seed",
            "n_prompts_eval",
            "model",
            "dtype",
            "max_new_tokens",
            "sampling_temperature",
        )
        return {k: self.settings[k] for k in keys} | {"requests": len(all_requests())}

    def _requests_of(self, split: str) -> list[str]:
        """The request of each pair of `split`: shuffled passes over the training requests (a
        prefix of a longer split is the shorter split)."""
        rng, out = random.Random(f"{self.settings['seed']}/pairs_{split}"), []
        while len(out) < self.settings[f"n_pairs_{split}"]:
            batch = list(self.train_requests)
            rng.shuffle(batch)
            out += batch[: self.settings[f"n_pairs_{split}"] - len(out)]
        return out

    def _sample_missing(self, pairs: dict, directory: Path) -> dict:
        """Sample every pair the cache lacks, appending each batch to it as it is done."""
        missing = {
            s: range(len(pairs[s]), self.settings[f"n_pairs_{s}"])
            for s in PAIR_SPLITS
            if len(pairs[s]) < self.settings[f"n_pairs_{s}"]
        }
        if not missing:
            return pairs
        sampler = PairSampler(self.model_spec, self.settings)
        total, done, start = sum(len(r) for r in missing.values()), 0, time.perf_counter()
        for split, indices in missing.items():
            requests = self._requests_of(split)
            for chunk in chunks(indices, self.batch_size):
                rows = sampler(split, PAIR_SPLITS.index(split), chunk, [requests[i] for i in chunk])
                SampleCache.append(directory / f"{split}.jsonl", rows)
                pairs[split] += rows
                done += len(chunk)
                rate = 2 * done / (time.perf_counter() - start)
                left = 2 * (total - done) / rate
                print(
                    f"[chat] sampled {done}/{total} pairs ({rate:.2f} samples/s, "
                    f"~{left / 60:.0f} min left)",
                    flush=True,
                )
        return pairs

    def _files(self, pairs: dict) -> dict:
        """Every task file's rows and the card, from the sampled pairs."""
        seed, tau = self.settings["seed"], self.settings["temperature"]
        data, bayes, agreement, skipped = {}, {}, {}, {}
        for split in PAIR_SPLITS:
            labelled = _label(pairs[split], f"{seed}/label/{split}", tau)
            rows, bayes[split], agreement[split], skipped[split] = labelled
            data[f"prefs_{split}.jsonl"] = rows
        for sft, split in (("sft_train.jsonl", "train"), ("sft_val.jsonl", "val")):
            data[sft] = [
                {"prompt": r["prompt"], "completion": r["chosen"]}
                for r in data[f"prefs_{split}.jsonl"]
            ]
        data["prompts_train.jsonl"] = [{"prompt": user(r)} for r in self.train_requests]
        data["prompts_eval.jsonl"] = [{"prompt": user(r)} for r in self.eval_requests]
        responses = [y for row in pairs["train"] for y in row["responses"]]
        gold = [
            _gold32(y, subject_keyword(row["request"]))
            for row in pairs["train"]
            for y in row["responses"]
        ]
        ended = [e for row in pairs["train"] for e in row["ended"]]
        data["card.json"] = {
            "task": self.name,
            "settings": dict(self.settings),
            "sizes": {name: len(rows) for name, rows in data.items()},
            "temperature": tau,
            "bayes_accuracy": bayes,
            "label_gold_agreement": agreement,
            "pairs_left_out": skipped,
            "gold_stats": {  # of the reference's own samples (the train split's responses)
                "mean": round(statistics.fmean(gold), 6),
                "std": round(statistics.pstdev(gold), 6),
            },
            "reference": {
                "ended_rate": round(sum(ended) / len(ended), 6),
                "well_formed_rate": round(
                    sum(map(judge.well_formed, responses)) / len(responses), 6
                ),
            },
            "gold_range": [judge.GOLD_MIN, judge.GOLD_MAX],
            "judge": judge.judge_versions(),
            "distinct_prompts": {
                "train": len(self.train_requests),
                "eval": len(self.eval_requests),
            },
            "description": DESCRIPTION,
        }
        return data


def _label(pairs: list[dict], stream: str, tau: float) -> tuple[list[dict], float, float, int]:
    """Bradley–Terry labels under gold; returns rows, Bayes accuracy, label agreement, left out.

    Bayes accuracy = mean σ(|g₁ − g₂| / τ); agreement = share of labels whose chosen response has
    the higher gold (a tie counts one half). Each label draws from its own stream (`stream`, pair).
    """
    rows, bayes, agree, skipped = [], 0.0, 0.0, 0
    for pair in pairs:
        a, b = pair["responses"]
        if a == b or not a.strip() or not b.strip():
            skipped += 1
            continue
        keyword = subject_keyword(pair["request"])
        g1, g2 = _gold32(a, keyword), _gold32(b, keyword)
        draw = random.Random(f"{stream}/{pair['pair']}").random()
        first_wins = draw < _sigmoid((g1 - g2) / tau)
        chosen, rejected = (a, b) if first_wins else (b, a)
        rows.append(
            {
                "prompt": user(pair["request"]),
                "chosen": _assistant(chosen),
                "rejected": _assistant(rejected),
            }
        )
        bayes += _sigmoid(abs(g1 - g2) / tau)
        agree += 0.5 if g1 == g2 else float((g1 > g2) == first_wins)
    n = max(1, len(rows))
    return rows, round(bayes / n, 6), round(agree / n, 6), skipped


def _assistant(response: str) -> list[dict]:
    return [{"role": "assistant", "content": response}]


def _gold32(response: str, keyword: str | None) -> float:
    """Gold rounded to float32, exactly the value `gold_reward` returns."""
    return float(torch.tensor(judge.score(response, keyword), dtype=torch.float32))


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # = 1 / (1 + e^(−x)), without overflow


def _check_settings(settings: dict, batch_size: int) -> None:
    n_requests = len(all_requests())
    for key in ("n_pairs_train", "n_pairs_val", "n_pairs_test", "max_new_tokens"):
        if not (isinstance(settings[key], int) and settings[key] >= 1):
            raise ConfigError(f"task.{key}={settings[key]}: must be an integer >= 1")
    if not 1 <= settings["n_prompts_eval"] < n_requests:
        raise ConfigError(
            f"task.n_prompts_eval={settings['n_prompts_eval']}: must be in [1, {n_requests - 1}] "
            f"(the task has {n_requests} distinct requests and keeps at least one for training)"
        )
    for key in ("temperature", "sampling_temperature"):
        if not settings[key] > 0:
            raise ConfigError(f"task.{key}={settings[key]}: must be > 0")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"task.batch_size={batch_size}: must be an integer >= 1")
