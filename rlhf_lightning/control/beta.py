"""β controllers: how the KL coefficient of J(θ) = E[r] − β·KL(p_θ ‖ p_ref) moves during training.

Plain Python objects (no torch state): ``value`` is the current β, ``update(kl, n_steps)`` feeds the
KL measured on the last batch and returns the new β; ``state_dict``/``load_state_dict`` carry β
through checkpoints (the hyperparameters come back from the config).
"""

from __future__ import annotations

import math
from typing import Any

from rlhf_lightning.errors import NumericalError


def _check(name: str, value: float, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"kl_controller.{name} must be {rule} (got {value!r})")


class BetaController:
    """Base class. Subclasses implement ``_next_beta(kl, n_steps)``."""

    def __init__(self, beta: float):
        _check("beta", beta, beta >= 0, ">= 0")
        self._beta = float(beta)

    @property
    def value(self) -> float:
        """The current β."""
        return self._beta

    def update(self, kl: float, n_steps: int = 1) -> float:
        """Feed the measured KL (nats per sequence) covering ``n_steps`` steps; return the new β."""
        kl = float(kl)
        if not math.isfinite(kl):
            raise NumericalError(
                f"KL fed to {type(self).__name__} is {kl}; beta left at {self._beta}"
            )
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1 (got {n_steps})")
        self._beta = float(self._next_beta(kl, n_steps))
        return self._beta

    def _next_beta(self, kl: float, n_steps: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "beta": self._beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("type", type(self).__name__)
        if saved != type(self).__name__:
            raise ValueError(
                f"checkpoint holds a {saved} state; cannot load it into {type(self).__name__}"
            )
        self._beta = float(state["beta"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self._beta:g})"


class FixedBeta(BetaController):
    """β never changes."""

    def _next_beta(self, kl: float, n_steps: int) -> float:
        return self._beta


class AdaptiveBeta(BetaController):
    """Proportional control of KL towards a target (Ziegler et al. 2019, eq. 2,
    https://arxiv.org/abs/1909.08593):

        e = clip((KL − target) / target, −0.2, 0.2),   β ← β · (1 + e · n_steps / horizon).

    ``n_steps`` counts what ``horizon`` counts: samples in the paper and in TRL, so pass the
    batch size.
    """

    def __init__(self, beta: float, target: float, horizon: int):
        _check("beta", beta, beta > 0, "> 0 (a multiplicative update cannot leave 0)")
        _check("target", target, target > 0, "> 0")
        _check("horizon", horizon, horizon > 0, "> 0")
        super().__init__(beta)
        self.target = float(target)
        self.horizon = horizon

    def _next_beta(self, kl: float, n_steps: int) -> float:
        error = min(max((kl - self.target) / self.target, -0.2), 0.2)
        return self._beta * (1.0 + error * n_steps / self.horizon)


class BudgetBeta(BetaController):
    """Dual ascent on β for  max E[r]  s.t.  KL ≤ ε  (β is the Lagrange multiplier):

        log_space=False:  β ← max(0, β + lr · (KL − ε))
        log_space=True:   log β ← log β + lr · (KL − ε) / ε     (default)

    The log-space step is a multiplicative update on the relative constraint violation: β stays
    positive without clipping, and ``lr`` means the same whatever the scale of ε or of β (a linear
    step of lr·(KL − ε) is in nats and must be retuned whenever ε changes). The linear form is the
    textbook projected dual ascent and can reach β = 0 (constraint inactive). One dual step is taken
    per call; ``n_steps`` is accepted for the common interface and does not scale the step.
    """

    def __init__(self, beta: float, epsilon: float, lr: float, log_space: bool = True):
        if log_space:
            _check("beta", beta, beta > 0, "> 0 with log_space=True")
        _check("epsilon", epsilon, epsilon > 0, "> 0")
        _check("lr", lr, lr > 0, "> 0")
        super().__init__(beta)
        self.epsilon = float(epsilon)
        self.lr = float(lr)
        self.log_space = log_space

    def _next_beta(self, kl: float, n_steps: int) -> float:
        if self.log_space:
            step = self.lr * (kl - self.epsilon) / self.epsilon
            beta = self._beta * math.exp(min(step, 709.0))  # math.exp raises past ~709.78
            if not math.isfinite(beta):
                raise NumericalError(
                    f"BudgetBeta: beta overflowed (KL {kl:g} vs epsilon {self.epsilon:g}); "
                    "lower kl_controller.lr"
                )
            return beta
        return max(0.0, self._beta + self.lr * (kl - self.epsilon))
