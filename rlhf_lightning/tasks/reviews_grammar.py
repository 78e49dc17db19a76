"""The word grammar of the `reviews` task: vocabulary, sampler, perturbations and the gold reward.

Grammar (words separated by single spaces, "." is a word, a response starts with a space):

    response := " " sentence { " " sentence }                    1–3 sentences
    sentence := DET NOUN VERB [ADV] ADJ [CONJ [ADV] ADJ] "."      e.g. "the plot was very good ."

Each adjective carries a sentiment score (great +2 … awful −2, some neutral); an intensifier
multiplies the adjective after it (very ×1.5, somewhat ×0.5). Prompts are neutral openings naming a
random title ("review of the silent harbor :").

The gold reward (the "human") of a response with sentences i = 1..n (a broken one has s_i = 0):

    clause  v = m(ADV) · score(ADJ)
    s_i     = v₁                      one adjective
            = (v₁ + v₂) / √2          "and": two opinions add up, with diminishing returns
            = 0.3·v₁ + 0.7·v₂         "but": the second opinion dominates
    T       = Σ_i s_i / √n            more sentences of the same opinion count, sub-linearly
    S       = A · tanh(T / A)         A = 2.5: sentiment saturates
    gold    = clip(S − P, −6, 3)

with penalties P for degenerate text: 1.5 per sentence that does not parse (unknown word, wrong
order, empty), 1.5 for no final ".", 1.0 per word repeated right after itself, 1.0 per adjective
repeated within a sentence, 0.25 per extra occurrence of a bigram, 1.0 per sentence beyond 3,
0.1 per word beyond 30, 0.5 for irregular whitespace; an empty response scores −3.
So gold rewards "more and stronger praise" only up to a point and punishes the ways of piling it up.
"""

from __future__ import annotations

import math
import random
from collections import Counter

DETERMINERS = ("the", "this", "its")
NOUNS = ("movie", "film", "plot", "acting", "story", "ending", "music", "cast", "script", "pacing")
VERBS = ("was", "is", "felt", "seemed")
INTENSIFIERS = {"very": 1.5, "really": 1.5, "quite": 1.25, "somewhat": 0.5}
ADJECTIVES = {
    "great": 2.0, "superb": 2.0, "brilliant": 2.0, "wonderful": 2.0,
    "good": 1.0, "nice": 1.0, "fun": 1.0, "clever": 1.0, "solid": 1.0,
    "decent": 0.5, "fine": 0.5,
    "okay": 0.0, "long": 0.0, "simple": 0.0, "short": 0.0,
    "slow": -0.5,
    "dull": -1.0, "weak": -1.0, "flat": -1.0, "bad": -1.0,
    "boring": -1.5,
    "awful": -2.0, "terrible": -2.0,
}  # fmt: skip
CONJUNCTIONS = ("and", "but")
END = "."
RESPONSE_WORDS = (
    DETERMINERS + NOUNS + VERBS + tuple(INTENSIFIERS) + tuple(ADJECTIVES) + CONJUNCTIONS + (END,)
)

PROMPT_TEMPLATES = (
    "review of the {} {} :",
    "my review of the {} {} :",
    "thoughts on the {} {} :",
    "notes on the {} {} :",
    "i watched the {} {} :",
)
TITLE_ADJECTIVES = (
    "silent", "hidden", "last", "lost", "old", "new", "quiet", "cold",
    "winter", "iron", "paper", "gold", "fire", "red", "second", "far",
)  # fmt: skip
TITLE_NOUNS = (
    "harbor", "castle", "river", "sea", "stone", "station", "letter", "island",
    "road", "storm", "tower", "forest", "door", "star", "king", "moon",
)  # fmt: skip

SATURATION = 2.5  # A: |S| < A
BROKEN, NO_END, ADJACENT, ADJ_REPEAT, BIGRAM = 1.5, 1.5, 1.0, 1.0, 0.25
EXTRA_SENTENCE, EXTRA_WORD, SPACING, EMPTY = 1.0, 0.1, 0.5, -3.0
MAX_SENTENCES, MAX_WORDS = 3, 30
GOLD_MIN, GOLD_MAX = -6.0, 3.0


def all_prompts() -> list[str]:
    """Every prompt of the task (templates × title adjectives × title nouns), in a fixed order."""
    return [
        template.format(adjective, noun)
        for template in PROMPT_TEMPLATES
        for adjective in TITLE_ADJECTIVES
        for noun in TITLE_NOUNS
    ]


# ---------------------------------------------------------------- sampler


def _adjective(rng: random.Random, mood: float, exclude: str = "") -> str:
    """An adjective whose score is near `mood`: p(adj) ∝ exp(−(score − mood)² / (2·0.75²))."""
    words = [w for w in ADJECTIVES if w != exclude]
    weights = [math.exp(-((ADJECTIVES[w] - mood) ** 2) / (2 * 0.75**2)) for w in words]
    return rng.choices(words, weights)[0]


def _clause(rng: random.Random, mood: float, exclude: str = "") -> list[str]:
    """[ADV] ADJ, with ADJ ≠ `exclude`."""
    words = [rng.choice(tuple(INTENSIFIERS))] if rng.random() < 0.35 else []
    return [*words, _adjective(rng, mood, exclude)]


def sample_sentence(rng: random.Random, mood: float) -> list[str]:
    """DET NOUN VERB [ADV] ADJ [CONJ [ADV] ADJ] "." with adjectives drawn around `mood`."""
    words = [rng.choice(DETERMINERS), rng.choice(NOUNS), rng.choice(VERBS), *_clause(rng, mood)]
    if rng.random() < 0.3:
        conjunction = "and" if rng.random() < 0.6 else "but"
        second_mood = mood if conjunction == "and" else -mood  # "good but slow"
        words += [conjunction, *_clause(rng, second_mood, exclude=words[-1])]
    return [*words, END]


def sample_response(rng: random.Random) -> str:
    """One review: a mood μ ~ N(0.25, 1.1²) for the whole text, then 1–3 sentences around it."""
    mood = rng.gauss(0.25, 1.1)
    n_sentences = rng.choices((1, 2, 3), (0.4, 0.35, 0.25))[0]
    words = [w for _ in range(n_sentences) for w in sample_sentence(rng, mood)]
    return " " + " ".join(words)


def perturb(rng: random.Random, response: str) -> str:
    """A mildly degenerate copy: one word repeated, the final "." dropped, or two words swapped."""
    words = response.split()
    kind = rng.choice(("repeat", "drop_end", "swap"))
    if kind == "drop_end" and len(words) > 1 and words[-1] == END:
        words.pop()
    elif kind == "swap" and len(words) > 2:
        i = rng.randrange(len(words) - 2)  # never the final "."
        words[i], words[i + 1] = words[i + 1], words[i]
    else:
        i = rng.randrange(len(words))
        words.insert(i, words[i])
    return " " + " ".join(words)


# ---------------------------------------------------------------- gold reward


def _clause_value(words: list[str]) -> float | None:
    """m(ADV)·score(ADJ) for "[ADV] ADJ", or None when it does not parse."""
    if len(words) == 2 and words[0] in INTENSIFIERS and words[1] in ADJECTIVES:
        return INTENSIFIERS[words[0]] * ADJECTIVES[words[1]]
    if len(words) == 1 and words[0] in ADJECTIVES:
        return ADJECTIVES[words[0]]
    return None


def sentence_sentiment(words: list[str]) -> float | None:
    """Sentiment s of DET NOUN VERB [ADV] ADJ [CONJ [ADV] ADJ] (without "."), or None if broken."""
    if len(words) < 4 or words[0] not in DETERMINERS or words[1] not in NOUNS:
        return None
    if words[2] not in VERBS:
        return None
    rest = words[3:]
    joints = [i for i, w in enumerate(rest) if w in CONJUNCTIONS]
    if not joints:
        return _clause_value(rest)
    if len(joints) > 1:
        return None
    v1, v2 = _clause_value(rest[: joints[0]]), _clause_value(rest[joints[0] + 1 :])
    if v1 is None or v2 is None:
        return None
    return (v1 + v2) / math.sqrt(2) if rest[joints[0]] == "and" else 0.3 * v1 + 0.7 * v2


def split_sentences(words: list[str]) -> list[list[str]]:
    """Sentences without their "."; trailing words with no "." form a last (unfinished) sentence."""
    sentences, current = [], []
    for word in words:
        if word == END:
            sentences.append(current)
            current = []
        else:
            current.append(word)
    if current:
        sentences.append(current)
    return sentences


def repetition_penalty(words: list[str], sentences: list[list[str]]) -> float:
    """Adjacent repeats, adjectives repeated within a sentence, and repeated bigrams."""
    adjacent = sum(a == b for a, b in zip(words, words[1:]))
    adj_repeats = 0
    for sentence in sentences:
        counts = Counter(w for w in sentence if w in ADJECTIVES)
        adj_repeats += sum(c - 1 for c in counts.values())
    bigrams = Counter(
        (a, b) for s in sentences for a, b in zip(s, s[1:])
    )  # within sentences, "." excluded
    extra_bigrams = sum(c - 1 for c in bigrams.values())
    return ADJACENT * adjacent + ADJ_REPEAT * adj_repeats + BIGRAM * extra_bigrams


def gold_score(response: str) -> float:
    """The gold reward of one response (formula in the module docstring). Never raises."""
    if not isinstance(response, str):
        return GOLD_MIN
    words = response.split()
    if not words:
        return EMPTY
    sentences = split_sentences(words)
    values = [sentence_sentiment(s) for s in sentences]
    total = sum(v for v in values if v is not None) / math.sqrt(len(sentences))
    sentiment = SATURATION * math.tanh(total / SATURATION)
    penalty = BROKEN * sum(v is None for v in values)
    penalty += NO_END * (words[-1] != END)
    penalty += repetition_penalty(words, sentences)
    penalty += EXTRA_SENTENCE * max(0, len(sentences) - MAX_SENTENCES)
    penalty += EXTRA_WORD * max(0, len(words) - MAX_WORDS)
    penalty += SPACING * (response != " " + " ".join(words))
    return min(GOLD_MAX, max(GOLD_MIN, sentiment - penalty))


def is_grammatical(response: str) -> bool:
    """True when the grammar can produce `response` (spacing, word order, words, final ".")."""
    words = response.split() if isinstance(response, str) else []
    if not words or words[-1] != END or response != " " + " ".join(words):
        return False
    sentences = split_sentences(words)
    return len(sentences) <= MAX_SENTENCES and all(
        sentence_sentiment(s) is not None for s in sentences
    )
