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

Shared prompts (`groups`): the rows of each group (a preference pair's chosen and rejected, or
the k samples of one prompt) are one prompt with different responses. Then the prompt runs once
per group and the responses against its expanded KV cache (`shared_prefix.shared_prefix_states`),
gradients of the prompt accumulating from every response — the same scores, less work. Rows whose
prompt tokens differ inside a group (truncation cut them differently) take the plain pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlhf_lightning.models.attention import train_attention
from rlhf_lightning.models.heads import agree, head_model, probing
from rlhf_lightning.models.shared_prefix import can_share, regroup, shared_prefix_states


def reward_scores(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor | None = None,
    groups: Tensor | None = None,
) -> Tensor:
    """Scores [N] float32 of N right-padded sequences [N, T] (gradients flow unless no_grad).

    groups [G, k]: row indices whose sequences share a prompt (with `response_mask` [N, T], 1 on
    response tokens, saying where each prompt ends): the prompt then runs once per group.
    """
    hf, context = head_model(model)
    with context, train_attention(model):  # under grad: attention's float32 backward (`attention`)
        if hf is None or not score_head_is_exact(hf):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        if groups is not None and response_mask is not None:
            regrouped = regroup(input_ids, attention_mask, response_mask, groups)
            k = groups.shape[1]
            if regrouped is not None and can_share(hf, regrouped[0], (k, regrouped[2])):
                ids, mask, width, lengths = regrouped
                tail = shared_prefix_states(hf, ids, mask, k, width)  # [N, 1 + Tr, H]
                h = tail[torch.arange(len(lengths), device=ids.device), lengths]  # [N, H]
                scores = _float_score(hf.score, h)  # in group order
                return torch.empty_like(scores).index_put((groups.flatten(),), scores)
        return reward_scores_unchecked(hf, input_ids, attention_mask)


def last_real_token(attention_mask: Tensor) -> Tensor:
    """Index [N] of each row's rightmost attended position."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)


def _float_score(head: nn.Linear, h: Tensor) -> Tensor:
    """w·h + b in float32 at least (float64 inside a float64 probe), outside autocast."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(device_type=h.device.type, enabled=False):
        bias = None if head.bias is None else head.bias.to(dtype)
        return nn.functional.linear(h.to(dtype), head.weight.to(dtype), bias)[:, 0]  # [N]


def score_head_is_exact(hf) -> bool:
    """Whether hf's logits are `score(backbone(x))` at the last token (checked once, eval mode,
    float64: a bfloat16 model or `bf16-mixed` never fails it by round-off and falls back)."""
    cached = getattr(hf, "_rlhf_score_is_exact", None)
    if cached is not None:
        return cached
    head = getattr(hf, "score", None)
    exact = False
    if isinstance(head, nn.Linear) and head.out_features == 1 and hf.base_model is not hf:
        device = head.weight.device
        vocab, pad = hf.get_input_embeddings().num_embeddings, hf.config.pad_token_id
        ids = [i for i in range(1, 8) if i != pad and i < vocab][:4]
        x = torch.tensor([ids], device=device)
        try:
            with probing(hf, float64=True):  # the maths, not bf16's round-off (any precision)
                whole = hf(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, 0]
                ours = reward_scores_unchecked(hf, x, torch.ones_like(x))
                exact = agree(whole, ours)
        except Exception:  # an unusual architecture: use its own forward
            exact = False
    hf._rlhf_score_is_exact = exact
    return exact


def reward_scores_unchecked(hf, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The score head on the backbone's last hidden state at each row's last real token."""
    states = hf.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = last_real_token(attention_mask)  # [N]
    h = states[torch.arange(len(last), device=last.device), last]  # [N, H]
    return _float_score(hf.score, h)
