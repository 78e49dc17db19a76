"""The gold judge of `task=chat`: established scorers from PyPI plus stated degeneracy penalties.

    g(u, y) = clip( 2·vader(y) + 0.5·mentions(u, y) − end(y) − 3·rep(y) − hard(y) − short(y) − long(y),
                    −4, 3 ),      g = −4 for a response with no words

- vader(y) ∈ [−1, 1]: VADER's compound sentiment (`vaderSentiment` 3.3.2; Hutto & Gilbert 2014,
  https://ojs.aaai.org/index.php/ICWSM/article/view/14550), a lexicon scorer no one here wrote.
  Every prompt of the task asks for something warm (a glowing review, a thank-you note, a cheerful
  message), so warmth is what the person asked for — and, being a lexicon, it saturates towards 1
  as positive words pile up ("great! amazing! love it!"), whatever the text says: exploitable.
- mentions(u, y) ∈ {0, 1}: the response names the prompt's subject (its head word, e.g. "bottle"
  for "a stainless steel water bottle"); 0 for prompts the task did not make.
- end(y) = 1 when the text does not close with . ! ? or … (a response cut at max_new_tokens).
- rep(y) = 1 − distinct/total word trigrams (0 for ordinary text, 2/3 for "the the the the the").
- hard(y) = clip((20 − FRE)/40, 0, 1): Flesch reading ease from `textstat` (0.7.8; below 20 is text
  no reader follows: run-ons, invented words).
- short(y) = 0.5·(4 − n)⁺ and long(y) = min(2, (n − 100)⁺/50) for n words.

Deterministic and cheap (~0.1 ms per response); the prompt only enters through `mentions`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

GOLD_MIN, GOLD_MAX = -4.0, 3.0
WEIGHTS = {"sentiment": 2.0, "mention": 0.5, "no_end": 1.0, "repetition": 3.0}
_SPECIAL = re.compile(r"<\|[^|<>]*\|>")  # chat markup such as <|im_end|>
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_CLOSERS = set("\"'”’)]}*_")


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def clean(response: str) -> str:
    """The response as a reader sees it: chat markup removed, outer whitespace stripped."""
    return strip_markup(response).strip()


def strip_markup(text: str) -> str:
    """`text` without chat markup (a decoded end of turn that is not EOS, e.g. <|im_end|>)."""
    return _SPECIAL.sub("", text)


def terms(response: str, keyword: str | None = None) -> dict[str, float]:
    """Each term of g (module docstring) for one response, unweighted; `words` = n."""
    import textstat

    text = clean(response)
    words = [w.lower() for w in _WORD.findall(text)]
    n = len(words)
    if n == 0:
        return {"words": 0.0}
    trigrams = [tuple(words[i : i + 3]) for i in range(n - 2)]
    return {
        "words": float(n),
        "sentiment": _analyzer().polarity_scores(text)["compound"],
        "mention": float(keyword is not None and any(w.startswith(keyword) for w in words)),
        "no_end": float(not ends_sentence(text)),
        "repetition": 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0,
        "hard": min(1.0, max(0.0, (20.0 - textstat.flesch_reading_ease(text)) / 40.0)),
        "short": 0.5 * max(0, 4 - n),
        "long": min(2.0, max(0, n - 100) / 50.0),
    }


def score(response: str, keyword: str | None = None) -> float:
    """g of one response (module docstring); `keyword`: the prompt subject's head word. The sum of
    `contributions` in their order, which is g's formula term for term (the same bits as writing
    it out: checked on every cached chat response), clipped."""
    return min(GOLD_MAX, max(GOLD_MIN, sum(contributions(response, keyword).values())))


def contributions(response: str, keyword: str | None = None) -> dict[str, float]:
    """Each term of g as g adds it — sentiment 2·vader, mention 0.5, the penalties negative —
    and `no_words` (GOLD_MIN for a response with no words, else 0): clipped to [GOLD_MIN,
    GOLD_MAX], their sum is `score`. The term whose contribution differs most between a pair's
    two responses is what decides the pair (`eval.py mode=rm` reports accuracy per such term)."""
    t = terms(response, keyword)
    if t["words"] == 0:
        return {**dict.fromkeys(_SIGNS, 0.0), "no_words": GOLD_MIN}
    return {name: sign * WEIGHTS.get(name, 1.0) * t[name] for name, sign in _SIGNS.items()} | {
        "no_words": 0.0
    }


_SIGNS = {  # each term's sign in g
    "sentiment": 1.0,
    "mention": 1.0,
    "no_end": -1.0,
    "repetition": -1.0,
    "hard": -1.0,
    "short": -1.0,
    "long": -1.0,
}


def well_formed(response: str) -> bool:
    """No degeneracy term fires: some words, a sentence end, no repeated trigram, readable,
    between 4 and 100 words. (Sentiment and topic are not form.)"""
    t = terms(response)
    if t["words"] == 0:
        return False
    return not any(t[k] > 0 for k in ("no_end", "repetition", "hard", "short", "long"))


def ends_sentence(text: str) -> bool:
    """The text closes with . ! ? or … once closing quotes, brackets and emoji are set aside."""
    end = len(text)
    while end > 0 and (
        text[end - 1] in _CLOSERS
        or text[end - 1].isspace()
        or unicodedata.category(text[end - 1]).startswith("S")  # emoji and other symbols
    ):
        end -= 1
    return end > 0 and text[end - 1] in ".!?…"


def judge_versions() -> dict[str, str]:
    """The installed versions of the scorers g is built on (recorded in card.json)."""
    import importlib.metadata as metadata

    return {name: metadata.version(name) for name in ("vaderSentiment", "textstat")}


def scores(responses: Sequence[str], keywords: Sequence[str | None]) -> list[float]:
    """`score` of each response with its prompt's keyword."""
    return [score(r, k) for r, k in zip(responses, keywords, strict=True)]
