"""The default built-in task: short movie-review continuations whose words carry sentiment.

Prompts are neutral openings ("review of the silent harbor :"); responses are 1–3 sentences of a
small word grammar (see `reviews_grammar`). SFT demonstrations are grammar samples. Preference
pairs are two independent responses to one prompt (a fraction `perturb_fraction` of them mildly
degenerate), labelled by sampling Bradley–Terry under the gold reward g at temperature τ:

    P(y₁ ≻ y₂) = σ((g(y₁) − g(y₂)) / τ)          (Bradley & Terry 1952; Christiano et al. 2017,
                                                   https://arxiv.org/abs/1706.03741)

so the Bayes-optimal preference accuracy of a split is mean σ(|g₁ − g₂| / τ): a classifier that
knows g picks the higher one and agrees with the sampled label with that probability.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.tasks import reviews_grammar as grammar
from rlhf_lightning.tasks.base import is_written, write_json_atomic, write_jsonl_atomic

DESCRIPTION = (
    "Movie-review continuations from a word grammar (DET NOUN VERB [ADV] ADJ [CONJ [ADV] ADJ] .) "
    "whose adjectives carry sentiment. Gold reward: saturating sentiment (A·tanh(Σ s_i / √n / A), "
    "A = 2.5) minus penalties for broken grammar, no final '.', repetition, more than 3 sentences "
    "and irregular spacing, clipped to [-6, 3]. Pairs are labelled by sampling Bradley-Terry under "
    "gold at the recorded temperature."
)
PAIR_SPLITS = ("train", "val", "test")


class ReviewsTask:
    """Generated review data, deterministic by `seed`, with a gold reward that plays the human.

    Args:
        seed: seeds every random stream (same seed → byte-identical files).
        n_sft: SFT demonstrations, split 90/10 into `sft_train` / `sft_val`.
        n_pairs_train, n_pairs_val, n_pairs_test: preference pairs per split.
        n_prompts_train, n_prompts_eval: rows of the prompt-only files; eval prompts are held out
            from every other file.
        temperature: τ of the Bradley–Terry labels (smaller τ → cleaner labels).
        perturb_fraction: probability that a response in a pair is mildly perturbed.
        context_tokens: words of generated context before every prompt (0: none) — a long-prompt
            workload like summarisation or chat histories (each grammar word is one token of the
            offline tokenizer). The context is fixed per prompt; the gold reward ignores it.
    """

    name = "reviews"

    def __init__(
        self,
        seed: int = 0,
        n_sft: int = 4000,
        n_pairs_train: int = 4000,
        n_pairs_val: int = 1000,
        n_pairs_test: int = 1000,
        n_prompts_train: int = 2000,
        n_prompts_eval: int = 128,
        temperature: float = 0.5,
        perturb_fraction: float = 0.15,
        context_tokens: int = 0,
    ):
        self.settings = {
            "seed": seed,
            "n_sft": n_sft,
            "n_pairs_train": n_pairs_train,
            "n_pairs_val": n_pairs_val,
            "n_pairs_test": n_pairs_test,
            "n_prompts_train": n_prompts_train,
            "n_prompts_eval": n_prompts_eval,
            "temperature": temperature,
            "perturb_fraction": perturb_fraction,
            "context_tokens": context_tokens,
        }
        _check_settings(self.settings)
        self._data: dict | None = None  # file name -> rows, and "card.json" -> card; built lazily

    def write(self, data_dir: Path) -> Path:
        """Write every task file into `data_dir` atomically; nothing happens if already written."""
        data_dir = Path(data_dir)
        if is_written(data_dir, self.settings):
            return data_dir
        # a half-rewritten folder must never pass for a written one
        (data_dir / "card.json").unlink(missing_ok=True)
        data = self._generate()
        for file_name, rows in data.items():
            if file_name != "card.json":
                write_jsonl_atomic(data_dir / file_name, rows)
        write_json_atomic(data_dir / "card.json", data["card.json"])
        return data_dir

    def corpus(self) -> Iterator[str]:
        """Every prompt, every grammar word, and grammar samples for realistic word frequencies."""
        yield from grammar.all_prompts()
        yield " " + " ".join(grammar.RESPONSE_WORDS)
        rng = random.Random(f"{self.settings['seed']}/corpus")
        for _ in range(2000):
            yield grammar.sample_response(rng)

    def gold_reward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Gold reward of each response, shape [B], float32 (the prompt does not enter)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return torch.tensor([grammar.gold_score(r) for r in responses], dtype=torch.float32)

    def well_formed(self, responses: Sequence[str]) -> list[bool]:
        """Whether each response parses (every sentence, at most 3, a final ".", single spaces):
        the perturbations of the pairs (a repeated word, a swap, a dropped ".") break it.
        `eval.py mode=rm` reports accuracy on pairs of such responses and on the others apart."""
        return [grammar.is_grammatical(r) for r in responses]

    def card(self) -> dict:
        """Settings, file sizes, τ, Bayes-optimal accuracy per split and SFT gold statistics."""
        return self._generate()["card.json"]

    def _generate(self) -> dict:
        if self._data is None:
            self._data = _generate(self.settings)
        return self._data


def _check_settings(settings: dict) -> None:
    n_prompts = len(grammar.all_prompts())
    for key in ("n_pairs_train", "n_pairs_val", "n_pairs_test", "n_prompts_train"):
        if settings[key] < 1:
            raise ConfigError(f"task.{key}={settings[key]}: must be at least 1")
    if settings["n_sft"] < 2:
        raise ConfigError(f"task.n_sft={settings['n_sft']}: must be at least 2 (train + val)")
    if not 1 <= settings["n_prompts_eval"] < n_prompts:
        raise ConfigError(
            f"task.n_prompts_eval={settings['n_prompts_eval']}: must be in [1, {n_prompts - 1}] "
            f"(the task has {n_prompts} distinct prompts and keeps at least one for training)"
        )
    if not settings["temperature"] > 0:
        raise ConfigError(f"task.temperature={settings['temperature']}: must be > 0")
    if not (isinstance(settings["context_tokens"], int) and settings["context_tokens"] >= 0):
        raise ConfigError(
            f"task.context_tokens={settings['context_tokens']}: must be an integer >= 0"
        )
    if not 0 <= settings["perturb_fraction"] <= 1:
        raise ConfigError(f"task.perturb_fraction={settings['perturb_fraction']}: not in [0, 1]")


def _generate(settings: dict) -> dict:
    """All rows of every file plus the card, from independent random streams per file."""
    seed = settings["seed"]
    prompts = [with_context(p, settings["context_tokens"], seed) for p in grammar.all_prompts()]
    random.Random(f"{seed}/prompts").shuffle(prompts)
    n_eval = settings["n_prompts_eval"]
    eval_prompts, train_pool = prompts[:n_eval], prompts[n_eval:]

    sft = _sft_rows(random.Random(f"{seed}/sft"), train_pool, settings["n_sft"])
    n_sft_val = max(1, round(settings["n_sft"] / 10))
    data = {"sft_train.jsonl": sft[n_sft_val:], "sft_val.jsonl": sft[:n_sft_val]}
    bayes, agreement = {}, {}
    for split in PAIR_SPLITS:
        rng = random.Random(f"{seed}/prefs_{split}")
        rows, bayes[split], agreement[split] = _preference_rows(rng, train_pool, settings, split)
        data[f"prefs_{split}.jsonl"] = rows
    prompt_rng = random.Random(f"{seed}/prompts_train")
    data["prompts_train.jsonl"] = [
        {"prompt": p} for p in _cycle(prompt_rng, train_pool, settings["n_prompts_train"])
    ]
    data["prompts_eval.jsonl"] = [{"prompt": p} for p in eval_prompts]

    sft_gold = [grammar.gold_score(row["completion"]) for row in sft]
    data["card.json"] = {
        "task": "reviews",
        "settings": dict(settings),
        "sizes": {name: len(rows) for name, rows in data.items()},
        "temperature": settings["temperature"],
        "bayes_accuracy": bayes,
        "label_gold_agreement": agreement,
        "gold_stats": {
            "mean": round(statistics.fmean(sft_gold), 6),
            "std": round(statistics.pstdev(sft_gold), 6),
        },
        "gold_range": [grammar.GOLD_MIN, grammar.GOLD_MAX],
        "distinct_prompts": {"train": len(train_pool), "eval": len(eval_prompts)},
        "description": DESCRIPTION,
    }
    return data


def with_context(prompt: str, words: int, seed: int) -> str:
    """`prompt` after `words` words of grammar text drawn from a stream keyed by the prompt."""
    if words == 0:
        return prompt
    rng, context = random.Random(f"{seed}/context/{prompt}"), []
    while len(context) < words:
        context += grammar.sample_response(rng).split()
    return " ".join(context[:words]) + " " + prompt


def _sft_rows(rng: random.Random, pool: list[str], n: int) -> list[dict]:
    """`n` demonstrations: a training prompt and a grammar sample."""
    rows = []
    for _ in range(n):
        rows.append({"prompt": rng.choice(pool), "completion": grammar.sample_response(rng)})
    return rows


def _cycle(rng: random.Random, pool: list[str], n: int) -> list[str]:
    """`n` prompts from repeated shuffled passes over `pool` (each used once before any repeats)."""
    out: list[str] = []
    while len(out) < n:
        batch = list(pool)
        rng.shuffle(batch)
        out += batch[: n - len(out)]
    return out


def _preference_rows(
    rng: random.Random, pool: list[str], settings: dict, split: str
) -> tuple[list[dict], float, float]:
    """Pairs labelled by Bradley–Terry sampling; returns rows, Bayes accuracy, label agreement.

    Bayes accuracy = mean σ(|g₁ − g₂| / τ); agreement = fraction of labels whose chosen response
    has the higher gold (a tie counts one half).
    """
    tau, perturb_fraction = settings["temperature"], settings["perturb_fraction"]
    rows, bayes, agree = [], 0.0, 0.0
    while len(rows) < settings[f"n_pairs_{split}"]:
        prompt = rng.choice(pool)
        pair = [grammar.sample_response(rng) for _ in range(2)]
        pair = [grammar.perturb(rng, y) if rng.random() < perturb_fraction else y for y in pair]
        if pair[0] == pair[1]:
            continue
        g1, g2 = (_gold32(y) for y in pair)
        first_wins = rng.random() < _sigmoid((g1 - g2) / tau)
        chosen, rejected = pair if first_wins else pair[::-1]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        bayes += _sigmoid(abs(g1 - g2) / tau)
        agree += 0.5 if g1 == g2 else float((g1 > g2) == first_wins)
    return rows, round(bayes / len(rows), 6), round(agree / len(rows), 6)


def _gold32(response: str) -> float:
    """Gold rounded to float32, exactly the value `gold_reward` returns."""
    return float(torch.tensor(grammar.gold_score(response), dtype=torch.float32))


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # = 1 / (1 + e^(−x)), without overflow
