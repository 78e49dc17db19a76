"""The reward model's score of a sequence, read at its last real token, computed in float32.

    r_φ(u, y) = w · h_L(last) + b,   h_L = the backbone's last hidden states [N, T, H]

`AutoModelForSequenceClassification` projects every position onto the score head and then picks
the last non-pad one; here only the last real token (the rightmost 1 of the attention mask) is
projected, and the projection runs in float32 outside autocast. Under `bf16-mixed` or bfloat16
weights the backbone runs in bfloat16 but the score does not: near-equal bf16 scores would
otherwise round to ties (measured: an untrained tiny RM's val/accuracy 0.30 in bf16 vs 0.61 in
fp32 on the same pairs). Training (`RewardModelModule`) and scoring (`LearnedReward`) both call
`reward_scores`, so a sample is scored exactly as its kind was trained. A model whose logits are
not `score(backbone(x))` is found by a one-time check and scored through its own forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlhf_lightning.models.logprobs import head_model


def reward_scores(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scores [N] float32 of N right-padded sequences [N, T] (gradients flow unless no_grad)."""
    hf, context = head_model(model)
    with context:
        if hf is None or not _score_head_is_exact(hf):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        return reward_scores_unchecked(hf, input_ids, attention_mask)


def last_real_token(attention_mask: Tensor) -> Tensor:
    """Index [N] of each row's rightmost attended position."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)


def _float_score(head: nn.Linear, h: Tensor) -> Tensor:
    with torch.autocast(device_type=h.device.type, enabled=False):
        bias = None if head.bias is None else head.bias.float()
        return nn.functional.linear(h.float(), head.weight.float(), bias)[:, 0]  # [N]


def _score_head_is_exact(hf) -> bool:
    """Whether hf's logits are `score(backbone(x))` at the last token (checked once, eval mode)."""
    cached = getattr(hf, "_rlhf_score_is_exact", None)
    if cached is not None:
        return cached
    head = getattr(hf, "score", None)
    exact = False
    if isinstance(head, nn.Linear) and head.out_features == 1 and hf.base_model is not hf:
        modes = [(m, m.training) for m in hf.modules()]
        device = head.weight.device
        vocab, pad = hf.get_input_embeddings().num_embeddings, hf.config.pad_token_id
        ids = [i for i in range(1, 8) if i != pad and i < vocab][:4]
        x = torch.tensor([ids], device=device)
        try:
            hf.eval()
            with torch.no_grad():
                whole = hf(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, 0].float()
                ours = reward_scores_unchecked(hf, x, torch.ones_like(x))
            exact = bool(torch.allclose(whole, ours, rtol=1e-3, atol=1e-4))
        except Exception:  # an unusual architecture: use its own forward
            exact = False
        finally:
            for module, mode in modes:
                module.training = mode
    hf._rlhf_score_is_exact = exact
    return exact


def reward_scores_unchecked(hf, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The score head on the backbone's last hidden state at each row's last real token."""
    states = hf.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = last_real_token(attention_mask)  # [N]
    h = states[torch.arange(len(last), device=last.device), last]  # [N, H]
    return _float_score(hf.score, h)
