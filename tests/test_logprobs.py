"""Per-token log-probabilities, entropies, the allowed-ids processor and response alignment."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf_lightning.generation.processors import AllowedTokensLogitsProcessor
from rlhf_lightning.models.logprobs import (
    entropy_from_logits,
    sequence_logprobs,
    token_logprobs,
)


def test_token_logprobs_hand_computed():
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # [1, 1, 2]
    assert token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    assert token_logprobs(logits, torch.tensor([[0]])).item() == pytest.approx(math.log(0.25))
    # temperature 2: softmax([0, ln 3 / 2]) = [1, √3] / (1 + √3)
    expected = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert token_logprobs(logits, torch.tensor([[1]]), 2.0).item() == pytest.approx(expected)


def test_token_logprobs_matches_manual_log_softmax():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    manual = (logits / 0.7).log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, labels, 0.7), manual)


def test_restriction_renormalises_over_allowed_ids_only():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 9)
    allowed = torch.tensor([2, 5, 7])
    labels = allowed[torch.randint(0, 3, (2, 4))]
    manual = logits[..., allowed].log_softmax(-1)  # [2, 4, 3]
    position = (labels[..., None] == allowed).float().argmax(-1)
    expected = manual.gather(-1, position[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, labels, allowed_token_ids=allowed), expected)
    # the allowed ids' probabilities sum to one at every position
    total = sum(
        token_logprobs(logits, torch.full((2, 4), a), allowed_token_ids=allowed).exp()
        for a in allowed
    )
    torch.testing.assert_close(total, torch.ones(2, 4))
    outside = token_logprobs(logits, torch.full((2, 4), 3), allowed_token_ids=allowed)
    assert torch.isneginf(outside).all()


def test_half_precision_path_matches_float32():
    torch.manual_seed(2)
    logits, labels = torch.randn(2, 3, 7).bfloat16(), torch.randint(0, 7, (2, 3))
    expected = token_logprobs(logits.float(), labels)
    torch.testing.assert_close(token_logprobs(logits, labels), expected)


def test_entropy_hand_computed():
    logits = torch.tensor([[[0.0, math.log(3.0), -1e9, -1e9]]])  # p = [1/4, 3/4, 0, 0]
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits).item() == pytest.approx(expected, abs=1e-6)
    uniform = torch.zeros(2, 3, 8)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(8)))
    restricted = entropy_from_logits(uniform, allowed_token_ids=torch.tensor([1, 4]))
    torch.testing.assert_close(restricted, torch.full((2, 3), math.log(2)))


def test_allowed_tokens_processor_masks_everything_else():
    scores = torch.arange(10.0).view(2, 5)
    out = AllowedTokensLogitsProcessor([1, 3])(torch.zeros(2, 1, dtype=torch.long), scores)
    torch.testing.assert_close(out[:, [1, 3]], scores[:, [1, 3]])
    assert torch.isneginf(out[:, [0, 2, 4]]).all()
    with pytest.raises(ValueError):
        AllowedTokensLogitsProcessor([])


class BigramLM(torch.nn.Module):
    """A causal LM whose logits at position t depend only on token t: logits = table[token]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])  # [B, T, V]


def test_sequence_logprobs_alignment():
    torch.manual_seed(3)
    model = BigramLM(torch.randn(6, 6))
    input_ids = torch.tensor([[0, 4, 1, 2, 3], [0, 5, 3, 1, 0]])  # bos, prompt, 2-3 response
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]])
    logprobs, logits = sequence_logprobs(model, input_ids, attention_mask, response_mask)
    assert logits.shape == (2, 5, 6)
    table_logp = model.table.detach().log_softmax(-1)
    # t is predicted from token t-1: log p(ids[t] | ids[t-1]) = log_softmax(table[ids[t-1]])
    assert logprobs[0, 2].item() == pytest.approx(table_logp[4, 1].item())
    assert logprobs[0, 4].item() == pytest.approx(table_logp[2, 3].item())
    assert logprobs[1, 3].item() == pytest.approx(table_logp[3, 1].item())
    assert (logprobs[:, :2] == 0).all() and logprobs[1, 4] == 0


def test_sequence_logprobs_restricted_has_finite_gradients():
    torch.manual_seed(4)
    model = BigramLM(torch.randn(6, 6))
    input_ids = torch.tensor([[0, 5, 1, 2, 1]])  # prompt token 5 lies outside the allowed ids
    mask = torch.ones_like(input_ids)
    response_mask = torch.tensor([[0, 0, 1, 1, 1]])
    allowed = torch.tensor([1, 2])
    logprobs, _ = sequence_logprobs(model, input_ids, mask, response_mask, 1.0, allowed)
    assert torch.isfinite(logprobs).all()
    expected = model.table.detach()[:, [1, 2]].log_softmax(-1)  # rows: previous token
    total = expected[5, 0] + expected[1, 1] + expected[2, 0]
    assert logprobs.sum().item() == pytest.approx(total.item(), abs=1e-6)
    logprobs.sum().backward()
    assert torch.isfinite(model.table.grad).all()
