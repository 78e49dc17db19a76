"""Per-token log-probabilities and entropies of a causal LM, optionally restricted to allowed ids.

Every stage scores responses the same way: one forward pass over `[bos] + prompt + response`, the
logit at position t−1 predicts the token at position t, and only response positions count.

Logits only where they are needed (`response_logprobs`): the network's backbone gives hidden
states [B, T, H]; the output head projects only the N positions that predict a response token,
in chunks of at most `chunk_tokens` positions and at most `LOGITS_BUDGET` logits (so a chunk
holds ≤ 256 MiB of float32 logits whatever the vocabulary: 441 positions at 152k), each chunk
recomputed in the backward pass (activation checkpointing of the head), so no [B, T, V] tensor —
nor [N, V] for more than one chunk — exists at once. Measured (benchmarks/README.md): one update
at a 152k vocabulary, 4 × 512 tokens, 5,983 MiB with full logits against 647 MiB.
A model whose logits are not `head(backbone(x))` (logit soft-capping, scaling) is found by a
one-time check and scored through its own forward with `logits_to_keep` instead, never wrongly.

Restriction to a set of allowed ids A (the `oracle` task's words) renormalises the softmax over A:
    log p_A(y_t | y_<t) = z_{y_t}/T − log Σ_{a∈A} exp(z_a/T),   and −inf for y_t ∉ A,
which is exactly the distribution sampled with `generation.processors.AllowedTokensLogitsProcessor`
(custom processors run before the temperature/top-k warpers in transformers' `generate`).
Model introspection (`head_model`, the head probe) lives in `heads.py`, the shared-prefix KV
cache (the prompt once per group of samples) in `shared_prefix.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rlhf_lightning.models import shared_prefix as sharing
from rlhf_lightning.models.attention import train_attention
from rlhf_lightning.models.heads import accepts, head_is_exact, head_model, position_ids

CHUNK_TOKENS = 2048  # positions projected onto the vocabulary at once, at most
LOGITS_BUDGET = 2**26  # logits per chunk at most (256 MiB in float32): fewer positions at big V


def _restrict(logits: Tensor, allowed_token_ids: Tensor | None) -> Tensor:
    """Logits over the allowed ids only, [..., K] (a small copy), or unchanged, [..., V]."""
    if allowed_token_ids is None:
        return logits
    return logits[..., allowed_token_ids.to(logits.device)]


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    allowed_token_ids: Tensor | None = None,
) -> Tensor:
    """log softmax(logits / T)[label] at every position, restricted to `allowed_token_ids` if given.

    Shapes: logits [B, T, V], labels [B, T] -> [B, T] float32. Labels outside the allowed set
    get −inf.
    Memory: gathers the label logit and subtracts a log-normaliser, so no extra [B, T, V] tensor is
    kept (float32 logits: one `logsumexp`; half precision: row by row in float32, as TRL does).
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float() / temperature  # [B, T]
    restricted = _restrict(logits, allowed_token_ids)  # [B, T, K] or [B, T, V]
    if restricted.dtype in (torch.float32, torch.float64):
        log_norm = torch.logsumexp(restricted.float() / temperature, dim=-1)  # [B, T]
    else:
        log_norm = torch.stack(
            [torch.logsumexp(row.float() / temperature, dim=-1) for row in restricted]
        )  # [B, T]
    logprobs = picked - log_norm
    if allowed_token_ids is not None:
        allowed = allowed_token_ids.to(labels.device)
        is_allowed = (labels.unsqueeze(-1) == allowed).any(-1)  # [B, T]
        logprobs = logprobs.masked_fill(~is_allowed, float("-inf"))
    return logprobs


def entropy_from_logits(
    logits: Tensor, temperature: float = 1.0, allowed_token_ids: Tensor | None = None
) -> Tensor:
    """Entropy H = −Σ_v p_v log p_v of softmax(logits / T) (over the allowed ids if given).

    Shapes: logits [B, T, V] -> [B, T] float32, in nats.
    """
    scaled = _restrict(logits, allowed_token_ids).float() / temperature  # [B, T, K|V]
    logp = torch.log_softmax(scaled, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
    allowed_token_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the response tokens of a batch, in one forward pass.

    Shapes: input_ids, attention_mask, response_mask [B, T]
        -> (logprobs [B, T] float32, logits [B, T, V]).
    Alignment: `logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`, computed from
    `logits[:, t-1]`; position 0 (BOS, nothing predicts it) is 0, and so is every position where
    `response_mask` is 0. Hence `logprobs.sum(-1)` is log p(response | prompt).
    The logits are returned unscaled (before temperature and restriction), e.g. for entropies.
    Gradients flow through the model; wrap the call in `torch.no_grad()` for a frozen reference.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
    return aligned_logprobs(
        logits, input_ids, response_mask, temperature, allowed_token_ids
    ), logits


def aligned_logprobs(
    logits: Tensor,
    input_ids: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
    allowed_token_ids: Tensor | None = None,
) -> Tensor:
    """`logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])` from `logits[:, t-1]`, [B, T].

    Position 0 and every position where `response_mask` is 0 are 0, so `.sum(-1)` is
    log p(response | prompt). Shared by every forward pass that scores responses.
    """
    shifted = token_logprobs(
        logits[:, :-1], input_ids[:, 1:], temperature, allowed_token_ids
    )  # [B, T-1]
    logprobs = torch.cat([torch.zeros_like(shifted[:, :1]), shifted], dim=1)  # [B, T]
    # `where`, not a product: a masked-out −inf (prompt token outside the allowed ids) must become 0.
    return torch.where(response_mask.bool(), logprobs, torch.zeros_like(logprobs))


class ResponseScores(NamedTuple):
    """What `response_logprobs` returns: [B, T] float32 (0 off the response) and [B, T, H]."""

    logprobs: Tensor
    entropy: Tensor | None
    hidden: Tensor | None


def response_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
    allowed_token_ids: Tensor | None = None,
    position_ids: Tensor | None = None,
    entropy: bool = False,
    hidden: bool = False,
    chunk_tokens: int = CHUNK_TOKENS,
    shared_prefix: tuple[int, int] | None = None,
) -> ResponseScores:
    """log p of the response tokens of a batch with logits at response positions only.

    Shapes: input_ids, attention_mask, response_mask [B, T] -> logprobs [B, T] float32 (aligned
    as `aligned_logprobs`: position t from the prediction at t−1; 0 where `response_mask` is 0 and
    at t = 0), entropy [B, T] of softmax(z/T) at the same positions (detached; `entropy=True`),
    hidden [B, T, H] the backbone's last hidden states (`hidden=True`, e.g. a value head; with a
    shared prefix, zeros before column Tp − 1). shared_prefix: (k, Tp), see the module docstring.
    Gradients flow into the model unless called under `torch.no_grad()`.
    """
    predict = response_mask[:, 1:].bool()  # [B, T-1]: column t-1 predicts token t
    rows, cols = predict.nonzero(as_tuple=True)  # [N]
    labels = input_ids[rows, cols + 1]  # [N]
    hf, context = head_model(model)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    with context, train_attention(model):  # under grad: attention's float32 backward (`attention`)
        if hf is not None and head_is_exact(hf):
            if shared_prefix is not None and sharing.can_share(hf, input_ids, shared_prefix):
                k, width = shared_prefix
                tail = sharing.shared_prefix_states(hf, input_ids, attention_mask, k, width)
                features = tail[rows, cols - (width - 1)]  # [N, H]; cols >= width - 1
                states = sharing.left_zeros(tail, width - 1) if hidden else None
            else:
                states = hf.base_model(**kwargs).last_hidden_state  # [B, T, H]
                features = states[rows, cols]  # [N, H]
            project = hf.get_output_embeddings()
        else:  # the model's own logits, for the response span only
            keep = input_ids.shape[1] - int(cols.min()) if len(cols) else 1
            out = _forward_keeping(model, kwargs, keep, hidden)
            states = out.hidden_states[-1] if hidden else None
            offset = input_ids.shape[1] - out.logits.shape[1]
            features, project = out.logits[rows, cols - offset], None  # [N, V]
        lp, ent = _chunked_scores(
            features, labels, project, temperature, allowed_token_ids, entropy, chunk_tokens
        )
    logprobs = _scatter(lp, rows, cols + 1, input_ids.shape)
    ent_full = _scatter(ent, rows, cols + 1, input_ids.shape) if entropy else None
    return ResponseScores(logprobs, ent_full, states if hidden else None)


def pair_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
    allowed_token_ids: Tensor | None = None,
    shared_prefix: bool = True,
    scored=None,
) -> Tensor:
    """Σ_t log p(y_t | u, y_<t) [2B] of a right-padded pair batch [2B, T] (rows i and B + i share
    their prompt: chosen rows, then rejected rows); response_mask [2B, T] is 1 on response tokens.

    With `shared_prefix` each pair's prompt runs once (`regroup` to [left-padded prompt |
    responses], then `response_logprobs(shared_prefix=(2, Tp))`); a batch whose pairs' prompt
    tokens differ (cut differently) or a model that cannot share takes the plain pass: the same
    sums to round-off. `scored(ids, mask) -> mask` narrows the positions summed in either layout
    (DPO: to the allowed ids); gradients flow unless called under `torch.no_grad()`.
    """
    scored = scored or (lambda ids, mask: mask)
    rows = len(input_ids)
    if shared_prefix and rows and rows % 2 == 0:
        half = torch.arange(rows // 2, device=input_ids.device)
        groups = torch.stack([half, half + len(half)], dim=1)  # [B, 2]: chosen, rejected
        regrouped = sharing.regroup(input_ids, attention_mask, response_mask, groups)
        if regrouped is not None:
            ids, attention, width, _ = regrouped
            columns = torch.arange(ids.shape[1], device=ids.device)
            scores = response_logprobs(
                model,
                ids,
                attention,
                scored(ids, attention * (columns >= width)),  # [2B, Tp + Tr] in pair order
                temperature,
                allowed_token_ids,
                position_ids=position_ids(attention),  # left-padded prompts
                shared_prefix=(2, width),
            )
            values = scores.logprobs.sum(-1)  # pair order: chosen₀, rejected₀, chosen₁, …
            return torch.empty_like(values).index_put((groups.flatten(),), values)
    mask = scored(input_ids, response_mask)
    return response_logprobs(
        model, input_ids, attention_mask, mask, temperature, allowed_token_ids
    ).logprobs.sum(-1)


def _scatter(values: Tensor, rows: Tensor, cols: Tensor, shape) -> Tensor:
    out = torch.zeros(shape, dtype=torch.float32, device=values.device)
    return out.index_put((rows, cols), values.float())


def _chunked_scores(features, labels, project, temperature, allowed, entropy, chunk_tokens):
    """log p [N] (and entropy [N]) of `labels` under softmax(project(features)/T), by chunks."""
    if len(labels) == 0:
        empty = features.new_zeros(0, dtype=torch.float32)
        return empty + features.sum() * 0, empty
    vocab = features.shape[-1] if project is None else project.weight.shape[0]
    size = max(1, min(chunk_tokens, LOGITS_BUDGET // max(vocab, 1)))
    pieces = list(zip(features.split(size), labels.split(size)))
    remat = features.requires_grad and len(pieces) > 1 and project is not None
    lps, ents = [], []
    for feats, labs in pieces:
        fn = _ChunkScore(project, temperature, allowed, entropy)
        if remat:  # keep only the features; the chunk's logits are recomputed in backward
            lp, ent = checkpoint(fn, feats, labs, use_reentrant=False)
        else:
            lp, ent = fn(feats, labs)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), (torch.cat(ents) if entropy else None)


class _ChunkScore:
    """One chunk: logits = project(features) in float32, then log p of the label and entropy."""

    def __init__(self, project, temperature, allowed, entropy):
        self.project, self.temperature = project, temperature
        self.allowed, self.entropy = allowed, entropy

    def __call__(self, feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        logits = feats if self.project is None else self.project(feats)  # [n, V]
        logits = logits.float()
        lp = token_logprobs(logits[None], labels[None], self.temperature, self.allowed)[0]
        ent = None
        if self.entropy:
            with torch.no_grad():
                ent = entropy_from_logits(logits.detach(), self.temperature, self.allowed)
        return lp, ent


def _forward_keeping(model, kwargs: dict, keep: int, hidden: bool):
    """model(**kwargs) returning logits of the last `keep` positions when the model can."""
    extra = {"output_hidden_states": True} if hidden else {}
    if accepts(model, "logits_to_keep"):
        extra["logits_to_keep"] = keep
    return model(**kwargs, **extra)


def forward_logprobs(
    model,
    input_ids,
    attention_mask,
    response_mask,
    temperature=1.0,
    allowed_token_ids=None,
    entropy: bool = False,
    hidden: bool = False,
    shared_prefix: tuple[int, int] | None = None,
) -> ResponseScores:
    """Per-token log p of the response tokens [B, T] (0 elsewhere), their entropies and the
    backbone's hidden states, with logits at response positions only (`response_logprobs`).

    `logprobs[:, t]` is log p(input_ids[:, t] | input_ids[:, :t]); positions are counted over
    real tokens (`position_ids`), as `generate` counts them. `shared_prefix` (k, Tp): groups of
    k rows share their prompt, which then runs once per group (`response_logprobs`).
    """
    return response_logprobs(
        model,
        input_ids,
        attention_mask,
        response_mask,
        temperature,
        allowed_token_ids,
        position_ids=position_ids(attention_mask),
        entropy=entropy,
        hidden=hidden,
        shared_prefix=shared_prefix,
    )
