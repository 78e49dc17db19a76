"""β controllers for the KL penalty: fixed, adaptive (target KL), budget (dual ascent on ε)."""

from rlhf_lightning.control.beta import AdaptiveBeta, BetaController, BudgetBeta, FixedBeta

__all__ = ["AdaptiveBeta", "BetaController", "BudgetBeta", "FixedBeta"]
