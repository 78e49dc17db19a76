"""The `oracle` task: a response space small enough to enumerate, so the optimum is known exactly.

Responses are every sequence of `length` words over `n_words` words (N = n_words**length ≥ 64),
written " w1 w2 w3" (leading space, no EOS: the length is fixed). Prompts are a handful of strings
"oracle prompt i :". With one token per word, p_ref(y|u), p*(y|u) and J* = β log Z are computed by
enumeration (`rlhf_lightning.analysis.optimum`).

Gold reward (one table [P, N] from the seed), for response y = (y_1, ..., y_L) under prompt u:
    g(u, y) = Σ_i a[u, i, y_i] + Σ_i b[u, y_i, y_{i+1}] + ε(u, y),
    a ~ N(0, 1) per-position word scores, b ~ N(0, 1) adjacent-pair interactions, ε ~ N(0, 0.1²),
then shifted and scaled per prompt to mean 0 / std 1 under the base distribution: the "raw" table.
A transformer must attend to the previous word to represent b, so the table is learnable but not
trivially (not a sum of per-position terms). `standardise(ref_logprobs)` re-standardises each row
under the SFT reference p_ref, as DESIGN.md asks; `rewards()` and `gold_reward` use the current
table.

Base distribution (what SFT demonstrations and preference samples are drawn from): independent
positions, p_base(y|u) = Π_i softmax(c[u, i])[y_i] with c ~ N(0, 1), so p_ref after SFT is
non-uniform.
Preference pairs are two distinct base samples labelled by Bradley–Terry under the raw gold at
temperature τ: P(y1 ≻ y2) = σ((g1 − g2)/τ); the Bayes-optimal accuracy is mean σ(|g1 − g2|/τ).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.tasks.base import is_written, write_json_atomic, write_jsonl_atomic

DEFAULT_WORDS = ("red", "green", "blue", "gold", "pink", "gray", "black", "white")
INTERACTION_SCALE = 1.0  # std of b, the adjacent-pair term
NOISE_SCALE = 0.1  # std of ε, the unstructured term
STREAMS = ("table", "base", "sft_train", "sft_val", "prefs_train", "prefs_val", "prefs_test")
SPLITS = ("train", "eval")  # prompt files


def _generator(seed: int, stream: str) -> torch.Generator:
    """An independent random stream per artefact, so changing one size leaves the rest unchanged."""
    return torch.Generator().manual_seed(seed * 1000 + STREAMS.index(stream))


class OracleTask:
    """Enumerable task: exact p_ref, p*, KL and J* (see module docstring)."""

    name = "oracle"

    def __init__(
        self,
        seed: int = 0,
        n_prompts: int = 4,
        words: Sequence[str] | None = None,
        n_words: int | None = None,
        length: int = 3,
        n_sft: int = 2000,
        n_sft_val: int = 200,
        n_pairs_train: int = 2000,
        n_pairs_val: int = 500,
        n_pairs_test: int = 500,
        temperature: float = 0.5,
        prompt_repeats: int = 16,
    ):
        self.words = self._resolve_words(words, n_words)
        self.seed, self.n_prompts, self.length = int(seed), int(n_prompts), int(length)
        self.sizes = {
            "sft_train": int(n_sft),
            "sft_val": int(n_sft_val),
            "prefs_train": int(n_pairs_train),
            "prefs_val": int(n_pairs_val),
            "prefs_test": int(n_pairs_test),
        }
        self.temperature = float(temperature)
        self.prompt_repeats = int(prompt_repeats)
        self._validate()
        self._grid = torch.tensor(
            list(itertools.product(range(len(self.words)), repeat=self.length))
        )  # [N, L] word index of each response position, lexicographic order
        self._texts = ["".join(" " + self.words[w] for w in row) for row in self._grid.tolist()]
        self._prompts = [f"oracle prompt {i} :" for i in range(self.n_prompts)]
        self._raw = self._make_raw_table()  # [P, N]
        self._table = self._raw.clone()
        self._token_cache: tuple[PreTrainedTokenizerBase, Tensor] | None = None

    @staticmethod
    def _resolve_words(words: Sequence[str] | None, n_words: int | None) -> tuple[str, ...]:
        if words is None:
            n = 4 if n_words is None else int(n_words)
            if n > len(DEFAULT_WORDS):
                raise ConfigError(
                    f"oracle task: n_words={n} exceeds the {len(DEFAULT_WORDS)} default words; "
                    "pass `words=[...]` explicitly"
                )
            return DEFAULT_WORDS[:n]
        words = tuple(str(w) for w in words)
        if n_words is not None and int(n_words) != len(words):
            raise ConfigError(f"oracle task: n_words={n_words} but {len(words)} words were given")
        return words

    def _validate(self) -> None:
        w, n = self.words, len(self.words) ** self.length
        if len(set(w)) != len(w) or any(not x or any(c.isspace() for c in x) for x in w):
            raise ConfigError(f"oracle task: words must be distinct, non-empty, no spaces: {w}")
        if self.length < 3 or len(w) < 2 or n < 64:
            raise ConfigError(
                f"oracle task: needs length >= 3 and >= 64 responses, got length={self.length}, "
                f"{len(w)} words ({n} responses); raise `length` or `n_words`"
            )
        if self.n_prompts < 1 or self.prompt_repeats < 1 or min(self.sizes.values()) < 1:
            raise ConfigError("oracle task: n_prompts, prompt_repeats and all sizes must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"oracle task: temperature must be > 0, got {self.temperature}")

    # -- the enumerable space ----------------------------------------------------------------------

    def prompts(self) -> list[str]:
        """The P prompts, in table-row order."""
        return list(self._prompts)

    def response_texts(self) -> list[str]:
        """The N responses, in table-column order (lexicographic over word indices)."""
        return list(self._texts)

    def response_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> Tensor:
        """Token ids of every response, LongTensor [N, L]; each word must be exactly one token."""
        if self._token_cache is not None and self._token_cache[0] is tokenizer:
            return self._token_cache[1]
        word_ids = []
        for word in self.words:
            ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ConfigError(
                    f"oracle task: word {' ' + word!r} is {len(ids)} tokens under this tokenizer, "
                    "the task needs exactly one; build the tokenizer from `task.corpus()` or "
                    "choose words that are single tokens"
                )
            word_ids.append(ids[0])
        ids = torch.tensor(word_ids)[self._grid]  # [N, L]
        encoded = tokenizer(self._texts, add_special_tokens=False)["input_ids"]
        if [list(row) for row in encoded] != ids.tolist():
            raise ConfigError("oracle task: the tokenizer does not split responses at word spaces")
        self._token_cache = (tokenizer, ids)
        return ids

    def allowed_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> Tensor:
        """The word token ids, LongTensor [n_words]: responses are the sequences over them."""
        return self.response_token_ids(tokenizer)[:, -1].unique(sorted=True)

    def generation_kwargs(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        """`generate()` arguments for fixed-length responses (no EOS)."""
        return {"min_new_tokens": self.length, "max_new_tokens": self.length}

    # -- rewards -----------------------------------------------------------------------------------

    def _make_raw_table(self) -> Tensor:
        g = _generator(self.seed, "table")
        p, n_words, length = self.n_prompts, len(self.words), self.length
        a = torch.randn(p, length, n_words, generator=g)  # per-position word scores
        b = torch.randn(p, n_words, n_words, generator=g) * INTERACTION_SCALE  # adjacent pairs
        noise = torch.randn(p, len(self._texts), generator=g) * NOISE_SCALE  # [P, N]
        grid = self._grid  # [N, L]
        positional = a[:, torch.arange(length), grid].sum(-1)  # [P, N]
        pairwise = b[:, grid[:, :-1], grid[:, 1:]].sum(-1)  # [P, N]
        return _standardise_rows(positional + pairwise + noise, self.base_logprobs())

    def base_logprobs(self) -> Tensor:
        """log p_base(y|u) of the demonstration/pair distribution, [P, N], rows logsumexp to 0."""
        g = _generator(self.seed, "base")
        logits = torch.randn(self.n_prompts, self.length, len(self.words), generator=g)
        logp = logits.log_softmax(-1)  # [P, L, W]
        return logp[:, torch.arange(self.length), self._grid].sum(-1)  # [P, N]

    def raw_rewards(self) -> Tensor:
        """The raw gold table [P, N] (standardised under the base distribution)."""
        return self._raw.clone()

    def standardise(self, ref_logprobs: Tensor) -> None:
        """Gold table mean 0 / std 1 under p_ref per prompt: r ← (r − E_ref r) / std_ref r.

        `ref_logprobs` [P, N] is renormalised per row (the reference restricted to the space).
        """
        expected = (self.n_prompts, len(self._texts))
        if tuple(ref_logprobs.shape) != expected:
            raise ValueError(
                f"ref_logprobs must be [P, N] = {list(expected)}, got {ref_logprobs.shape}"
            )
        self._table = _standardise_rows(self._raw, ref_logprobs.detach().float().cpu())

    def rewards(self) -> Tensor:
        """Current gold table [P, N]: standardised under p_ref if `standardise` ran, else raw."""
        return self._table.clone()

    def gold_reward(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """Look up each (prompt, response) in the current table, [B] float32.

        Text outside the space (unknown prompt, or a response that is not exactly one of
        `response_texts()`) scores min(table) − 1: below every valid response, never an error.
        """
        prompt_index = {text: i for i, text in enumerate(self._prompts)}
        response_index = {text: j for j, text in enumerate(self._texts)}
        floor = float(self._table.min()) - 1.0
        values = [
            float(self._table[prompt_index[u], response_index[y]])
            if u in prompt_index and y in response_index
            else floor
            for u, y in zip(prompts, responses, strict=True)
        ]
        return torch.tensor(values, dtype=torch.float32)

    # -- data files --------------------------------------------------------------------------------

    def corpus(self) -> Iterator[str]:
        """Every prompt + response text: enough for BPE to make each ' word' one token."""
        for prompt in self._prompts:
            for text in self._texts:
                yield prompt + text

    def settings(self) -> dict:
        return {
            "name": self.name,
            "seed": self.seed,
            "n_prompts": self.n_prompts,
            "words": list(self.words),
            "length": self.length,
            "sizes": dict(self.sizes),
            "temperature": self.temperature,
            "prompt_repeats": self.prompt_repeats,
        }

    def _sample(self, split: str) -> tuple[Tensor, Tensor]:
        """Prompt index [n] (cycling over prompts) and base-distribution response index [n]."""
        n = self.sizes[split]
        prompt = torch.arange(n) % self.n_prompts
        probs = self.base_logprobs().exp()[prompt]  # [n, N]
        return prompt, torch.multinomial(probs, 1, generator=_generator(self.seed, split))[:, 0]

    def _pairs(self, split: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Prompt [n], chosen [n], rejected [n] indices and the Bayes accuracy per pair [n]."""
        g = _generator(self.seed, split)
        prompt = torch.arange(self.sizes[split]) % self.n_prompts
        probs = self.base_logprobs().exp()[prompt]  # [n, N]
        first, second = torch.multinomial(probs, 2, generator=g).unbind(-1)  # distinct per row
        margin = (self._raw[prompt, first] - self._raw[prompt, second]) / self.temperature
        first_wins = torch.rand(len(prompt), generator=g) < torch.sigmoid(margin)
        chosen = torch.where(first_wins, first, second)
        rejected = torch.where(first_wins, second, first)
        return prompt, chosen, rejected, torch.sigmoid(margin.abs())

    def card(self) -> dict:
        """Settings, rows per file, labelling temperature τ and, per preference split, the
        Bayes-optimal accuracy mean σ(|g1 − g2|/τ) and the share of labels that agree with gold."""
        bayes, agreement = {}, {}
        for split in ("train", "val", "test"):
            prompt, chosen, rejected, ceiling = self._pairs(f"prefs_{split}")
            bayes[split] = float(ceiling.mean())
            agree = self._raw[prompt, chosen] > self._raw[prompt, rejected]
            agreement[split] = float(agree.float().mean())
        sizes = {f"{split}.jsonl": n for split, n in self.sizes.items()}
        sizes.update({f"prompts_{s}.jsonl": self.n_prompts * self.prompt_repeats for s in SPLITS})
        return {
            "task": self.name,
            "settings": self.settings(),
            "sizes": sizes,
            "n_responses": len(self._texts),
            "temperature": self.temperature,
            "bayes_accuracy": bayes,
            "label_gold_agreement": agreement,
        }

    def write(self, data_dir: Path) -> Path:
        """Write the TRL-format files of `TASK_FILES` (idempotent, atomic per file)."""
        data_dir = Path(data_dir)
        if is_written(data_dir, self.settings()):
            return data_dir
        for split in ("train", "val"):
            prompt, response = self._sample(f"sft_{split}")
            rows = [
                {"prompt": self._prompts[u], "completion": self._texts[y]}
                for u, y in zip(prompt.tolist(), response.tolist(), strict=True)
            ]
            write_jsonl_atomic(data_dir / f"sft_{split}.jsonl", rows)
        for split in ("train", "val", "test"):
            prompt, chosen, rejected, _ = self._pairs(f"prefs_{split}")
            rows = [
                {
                    "prompt": self._prompts[u],
                    "chosen": self._texts[c],
                    "rejected": self._texts[r],
                }
                for u, c, r in zip(prompt.tolist(), chosen.tolist(), rejected.tolist(), strict=True)
            ]
            write_jsonl_atomic(data_dir / f"prefs_{split}.jsonl", rows)
        for split in SPLITS:
            rows = [{"prompt": p} for _ in range(self.prompt_repeats) for p in self._prompts]
            write_jsonl_atomic(data_dir / f"prompts_{split}.jsonl", rows)
        write_json_atomic(data_dir / "card.json", self.card())  # last: marks the folder complete
        return data_dir


def _standardise_rows(table: Tensor, logprobs: Tensor) -> Tensor:
    """(r − E_p r) / std_p r per row, with p = exp(logprobs) renormalised; [P, N] -> [P, N]."""
    probs = logprobs.double().softmax(-1)
    values = table.double()
    mean = (probs * values).sum(-1, keepdim=True)
    std = (probs * (values - mean) ** 2).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)
    return ((values - mean) / std).float()
