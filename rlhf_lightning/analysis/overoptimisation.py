"""Reward over-optimisation: the Gao et al. fit of gold reward against KL, and best-of-n curves.

Gao, Schulman & Hilton 2022, "Scaling laws for reward model overoptimization",
https://arxiv.org/abs/2210.10760. With d = sqrt(KL(π ‖ π_init)) and R the gold reward relative
to the initial policy (R(0) = 0), the functional forms are

    RL:          R(d) = d (α − b log d)        peak at d* = exp(α/b − 1), R(d*) = b d*
    best-of-n:   R(d) = d (α − b d)

Best-of-n (Stiennon et al. 2020, https://arxiv.org/abs/2009.01325, appendix G.3): draw n samples
from π_init, keep the one with the highest proxy reward. Its KL to π_init is (for distinct samples)

    KL_bon(n) = log n − (n − 1)/n,

and from N ≥ n samples per prompt, sorted by proxy x_(1) ≤ … ≤ x_(N), the expectation of any value
v of the proxy-best of n is estimated without bias by averaging over all C(N, n) subsets:

    E[v_best-of-n] = Σ_{i=n}^{N} C(i−1, n−1) / C(N, n) · v_(i)

(the i-th ranked sample is the maximum of exactly C(i−1, n−1) of the subsets of size n).
No Lightning here: plain tensors and floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def best_of_n_kl(n: int) -> float:
    """KL(π_bon ‖ π_init) = log n − (n − 1)/n for best-of-n sampling (0 at n = 1)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_weights(n_samples: int, n: int) -> Tensor:
    """Weight of each ascending rank i = 1..N in E[max of a random n-subset], [N] float64.

    w_i = C(i−1, n−1) / C(N, n); the weights sum to 1 and are 0 for i < n.
    """
    if not 1 <= n <= n_samples:
        raise ValueError(f"best-of-n needs 1 <= n <= N, got n={n}, N={n_samples}")
    total = math.comb(n_samples, n)
    return torch.tensor(
        [math.comb(i - 1, n - 1) / total for i in range(1, n_samples + 1)], dtype=torch.float64
    )


def best_of_n_expectation(proxy: Tensor, values: Tensor, n: int) -> Tensor:
    """Unbiased E[value of the proxy-best of n] per prompt from N samples each.

    proxy [P, N] ranks the samples; values [P, N] is what is averaged (the proxy itself, or the
    gold reward). Returns [P] float64. Ties in the proxy are broken by position.
    """
    order = proxy.double().argsort(dim=-1, stable=True)  # [P, N] ascending
    ranked = values.double().gather(-1, order)  # [P, N]
    return ranked @ best_of_n_weights(proxy.shape[-1], n)  # [P]


def default_ns(n_samples: int) -> list[int]:
    """n = 1, 2, 4, …, up to N (and N itself when it is not a power of two)."""
    ns = [2**k for k in range(n_samples.bit_length()) if 2**k <= n_samples]
    return ns if ns[-1] == n_samples else [*ns, n_samples]


def best_of_n_curve(
    proxy: Tensor, gold: Tensor | None = None, ns: Sequence[int] | None = None
) -> list[dict[str, float]]:
    """One point per n: {"n", "kl", "sqrt_kl", "proxy", "gold"?}, averaged over prompts.

    proxy, gold: [P, N] rewards of N samples per prompt from the initial policy.
    """
    points = []
    for n in ns or default_ns(proxy.shape[-1]):
        kl = best_of_n_kl(n)
        point = {
            "n": n,
            "kl": kl,
            "sqrt_kl": math.sqrt(kl),
            "proxy": float(best_of_n_expectation(proxy, proxy, n).mean()),
        }
        if gold is not None:
            point["gold"] = float(best_of_n_expectation(proxy, gold, n).mean())
        points.append(point)
    return points


@dataclass(frozen=True)
class GaoFit:
    """R(d) = d (α − b log d), fitted to gold − gold(0) against d = sqrt(KL)."""

    alpha: float
    b: float

    def __call__(self, d: Tensor) -> Tensor:
        """R(d), with R(0) = 0 (the limit of d log d)."""
        d = torch.as_tensor(d, dtype=torch.float64)
        safe = d.clamp_min(torch.finfo(torch.float64).tiny)
        return torch.where(d > 0, d * (self.alpha - self.b * safe.log()), torch.zeros_like(d))

    @property
    def peak_sqrt_kl(self) -> float | None:
        """d* = exp(α/b − 1), where R'(d) = α − b − b log d = 0; None when b ≤ 0 (no peak)."""
        if self.b <= 0:
            return None
        exponent = self.alpha / self.b - 1.0
        return math.exp(exponent) if exponent < 700 else math.inf  # beyond float64: no peak in view

    @property
    def peak_kl(self) -> float | None:
        """KL at the fitted peak, d*²."""
        d = self.peak_sqrt_kl
        return None if d is None else d * d


def fit_gao_rl(sqrt_kl: Sequence[float] | Tensor, gold: Sequence[float] | Tensor) -> GaoFit | None:
    """Least-squares α, b of R(d) = α·d − b·d·log d (linear in α, b) over points with d > 0.

    sqrt_kl, gold: [M] (gold relative to the initial policy's). The residuals are in reward units
    (not gold/d = α − b log d, which would blow up the noise of points near d = 0). Returns None
    with fewer than two usable points or a degenerate design (all d equal, or all d = 1).
    """
    d = torch.as_tensor(sqrt_kl, dtype=torch.float64)
    y = torch.as_tensor(gold, dtype=torch.float64)
    keep = (d > 0) & torch.isfinite(d) & torch.isfinite(y)
    d, y = d[keep], y[keep]
    if d.numel() < 2:
        return None
    design = torch.stack([d, -d * d.log()], dim=-1)  # [M, 2]: columns multiply α and b
    if torch.linalg.matrix_rank(design) < 2:
        return None
    solution = torch.linalg.lstsq(design, y[:, None], driver="gelsd").solution[:, 0]
    return GaoFit(alpha=float(solution[0]), b=float(solution[1]))


def measured_peak(points: Sequence[dict], key: str = "gold") -> dict | None:
    """The point with the highest `key` (first one on ties), or None when no point has it."""
    scored = [p for p in points if p.get(key) is not None and math.isfinite(p[key])]
    return max(scored, key=lambda p: p[key]) if scored else None
