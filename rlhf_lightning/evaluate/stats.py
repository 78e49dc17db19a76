"""The statistics of `eval.py`: bootstrap intervals over prompts, win rates, calibration, degeneracy.

Plain numpy, no torch, no Lightning. Every number `eval.py` reports is an `Estimate`: the mean over
all samples and a percentile-bootstrap interval (Efron & Tibshirani 1993, ch. 13) from resampling
*prompts* with replacement, so samples of one prompt, which are not independent, move together
(a cluster bootstrap). A fixed seed makes the interval reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A mean and its bootstrap interval [lo, hi] at `level` (None where nothing is random)."""

    mean: float
    lo: float | None = None
    hi: float | None = None
    level: float = 0.95

    def excludes(self, value: float) -> bool:
        """True when `value` lies outside the interval: a difference larger than the noise."""
        return self.lo is not None and not self.lo <= value <= self.hi

    def as_dict(self) -> dict:
        return asdict(self)

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        if self.lo is None:
            return f"{self.mean:{spec}}"
        return f"{self.mean:{spec}} [{self.lo:{spec}}, {self.hi:{spec}}]"


def group_ids(keys: Sequence) -> np.ndarray:
    """Integer cluster id [N] of each key (e.g. each sample's prompt text), in order of first use."""
    first: dict = {}
    return np.array([first.setdefault(k, len(first)) for k in keys], dtype=np.int64)


def bootstrap_distribution(
    values, groups=None, n_resamples: int = 2000, seed: int = 0
) -> np.ndarray:
    """Means of `n_resamples` cluster resamples [n_resamples].

    values [N]; groups [N] cluster ids (None: each value its own cluster). A resample draws G of
    the G clusters with replacement and takes Σ values / Σ counts over the drawn clusters, so
    clusters of unequal size weigh by their size, as in the full-sample mean.
    """
    values = np.asarray(values, dtype=np.float64)
    groups = np.arange(len(values)) if groups is None else np.asarray(groups)
    _, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values)  # [G]
    counts = np.bincount(inverse).astype(np.float64)  # [G]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(n_resamples, len(sums)))  # [B, G]
    return sums[picks].sum(-1) / counts[picks].sum(-1)


def bootstrap(
    values, groups=None, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> Estimate:
    """The mean of `values` [N] with a percentile-bootstrap interval over `groups` (clusters)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return Estimate(float("nan"), level=level)
    stats = bootstrap_distribution(values, groups, n_resamples, seed)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(values.mean()), float(lo), float(hi), level)


def win_rates(a, b) -> np.ndarray:
    """Per-row win rate of side a over side b [R] from scores a, b [R, k] (k samples per row).

        w = mean over pairs (i, j) of 1[a_i > b_j] + ½·1[a_i = b_j]        (ties count half)

    With k ≥ 2 only pairs i ≠ j count: samples i of both sides share their random draws (keyed
    sampling), so the pair (i, i) is not two independent draws; pairs of different keys are, and
    `w` estimates P(r(y) > r(y')) + ½·P(tie) for independent y ~ a, y' ~ b without bias. With k = 1
    the one (coupled) pair is all there is.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"win rates need two [R, k] score arrays, got {a.shape} and {b.shape}")
    diff = a[:, :, None] - b[:, None, :]  # [R, k, k]: a_i − b_j
    outcome = (diff > 0) + 0.5 * (diff == 0)
    k = a.shape[1]
    if k == 1:
        return outcome[:, 0, 0]
    off_diagonal = ~np.eye(k, dtype=bool)
    return outcome[:, off_diagonal].mean(-1)


def pairwise_confidence(margin) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) [N] of a Bradley–Terry judge from margins r⁺ − r⁻ [N].

    The judge prefers the response with the larger score, with probability σ(|r⁺ − r⁻|) ∈ [½, 1];
    it is correct when it prefers the labelled `chosen` one (a tie: confidence ½, half correct).
    Folding σ(r⁺ − r⁻) this way loses nothing: the pair seen the other way round is its mirror.
    """
    margin = np.asarray(margin, dtype=np.float64)
    confidence = 1.0 / (1.0 + np.exp(-np.abs(margin)))
    correct = (margin > 0) + 0.5 * (margin == 0)
    return confidence, correct.astype(np.float64)


def reliability_bins(confidence, correct, n_bins: int = 10, low: float = 0.5) -> list[dict]:
    """Equal-width bins of `confidence` over [low, 1]: {lo, hi, count, confidence, accuracy}.

    confidence, correct: [N]. Empty bins have count 0 and NaN means. The last bin is closed.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(low, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)  # [N] bin of each value
    bins = []
    for b in range(n_bins):
        inside = index == b
        n = int(inside.sum())
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": n,
                "confidence": float(confidence[inside].mean()) if n else float("nan"),
                "accuracy": float(correct[inside].mean()) if n else float("nan"),
            }
        )
    return bins


def expected_calibration_error(confidence, correct, n_bins: int = 10, low: float = 0.5) -> float:
    """ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b| over `reliability_bins` (Guo et al. 2017,
    https://arxiv.org/abs/1706.04599, eq. 3)."""
    bins = reliability_bins(confidence, correct, n_bins, low)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return float("nan")
    return float(
        sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    )


def bootstrap_ece(
    confidence,
    correct,
    groups=None,
    n_bins: int = 10,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    low: float = 0.5,
) -> Estimate:
    """ECE of all pairs, with a percentile interval from resampling `groups` (the same draws as
    `bootstrap` with the same seed). Uses ECE = Σ_b |Σ correct_b − Σ confidence_b| / N.

    ECE is biased upward (|noise| adds to every bin's gap), and a resample adds noise again, so
    the interval tends to sit above the estimate: read its width, not its position."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    groups = np.arange(len(confidence)) if groups is None else np.asarray(groups)
    _, inverse = np.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    edges = np.linspace(low, 1.0, n_bins + 1)
    cell = inverse * n_bins + np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    size = n_groups * n_bins

    def per_cell(weights):  # [G, n_bins] sums over each cluster's pairs in each bin
        return np.bincount(cell, weights=weights, minlength=size).reshape(n_groups, n_bins)

    count, conf, corr = per_cell(None), per_cell(confidence), per_cell(correct)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_groups, size=(n_resamples, n_groups))  # [B, G]
    times = np.zeros((n_resamples, n_groups))  # [B, G] how often each cluster was drawn
    np.add.at(times, (np.repeat(np.arange(n_resamples), n_groups), picks.ravel()), 1.0)
    eces = np.abs(times @ corr - times @ conf).sum(-1) / (times @ count).sum(-1)  # [B]
    lo, hi = np.quantile(eces, [(1 - level) / 2, (1 + level) / 2])
    full = expected_calibration_error(confidence, correct, n_bins, low)
    return Estimate(full, float(lo), float(hi), level)


def has_repeated_ngram(text: str, n: int = 3) -> bool:
    """True when some run of `n` words occurs twice in `text` (words split on whitespace)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def degenerate_flags(texts: Sequence[str], ended, n: int = 3, need_end: bool = True) -> dict:
    """Per-response 0/1 arrays [N]: `repeated_ngram`, `no_end` (no EOS before the length limit;
    all 0 when `need_end` is False, e.g. fixed-length tasks) and `degenerate` (either)."""
    repeated = np.array([has_repeated_ngram(t, n) for t in texts], dtype=np.float64)
    no_end = 1.0 - np.asarray(ended, dtype=np.float64) if need_end else np.zeros(len(texts))
    return {
        "repeated_ngram": repeated,
        "no_end": no_end,
        "degenerate": np.maximum(repeated, no_end),
    }
