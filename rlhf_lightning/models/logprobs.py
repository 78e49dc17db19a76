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
which is exactly the distribution `generate()` samples from with `AllowedTokensLogitsProcessor`
(custom processors run before the temperature/top-k warpers in transformers' `generate`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import LogitsProcessor, PreTrainedModel

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


class AllowedTokensLogitsProcessor(LogitsProcessor):
    """Sets every score outside `allowed_token_ids` to −inf, so `generate()` samples only those ids.

    Use as `model.generate(..., logits_processor=[AllowedTokensLogitsProcessor(ids)])`. The
    sampled distribution is then the renormalised one that
    `token_logprobs(..., allowed_token_ids=ids)` scores.
    """

    def __init__(self, allowed_token_ids: Tensor | list[int]):
        ids = torch.as_tensor(allowed_token_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("AllowedTokensLogitsProcessor needs at least one allowed token id")
        self.allowed_token_ids = ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: [B, V]
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        keep[self.allowed_token_ids.to(scores.device)] = True
        return scores.masked_fill(~keep, float("-inf"))


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


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only (left padding gets 0), as `generate` uses."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


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
    with context:
        if hf is not None and _head_is_exact(hf):
            if shared_prefix is not None and _can_share(hf, input_ids, shared_prefix):
                k, width = shared_prefix
                tail = _shared_prefix_states(hf, input_ids, attention_mask, k, width)
                features = tail[rows, cols - (width - 1)]  # [N, H]; cols >= width - 1
                states = _left_zeros(tail, width - 1) if hidden else None
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
    if _accepts(model, "logits_to_keep"):
        extra["logits_to_keep"] = keep
    return model(**kwargs, **extra)


def _accepts(model, name: str) -> bool:
    target = getattr(model, "policy", model)  # the LoRA reference wraps its policy
    try:
        return name in inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return False


def head_model(model):
    """(the transformers model to split into backbone and head, the context to call it in), or
    (None, a null context) for models we only call whole (FSDP-wrapped, foreign callables)."""
    from rlhf_lightning.models.lora import AdapterDisabledReference

    if isinstance(model, AdapterDisabledReference):
        return _unwrap_peft(model.policy), model.adapter_off()
    inner = _unwrap_peft(model)
    if isinstance(inner, PreTrainedModel):
        return inner, contextlib.nullcontext()
    return None, contextlib.nullcontext()


def _unwrap_peft(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@contextlib.contextmanager
def probing(hf, float64: bool = False):
    """Eval mode, no grad and no autocast for a one-time probe; every module's train/eval flag
    restored after (the policy's checkpointed layers keep theirs).

    float64: the probe runs on float64 copies of every floating parameter and buffer, restored to
    the original tensors after (exact, whatever the dtype). A probe then judges the computation, not
    its round-off: 30 layers of float32 round-off put SmolLM2-135M's states 1–2e-3 apart at
    magnitude ~55, and bfloat16 far more, though shared-prefix and plain passes are the same maths.
    """
    modes = [(m, m.training) for m in hf.modules()]
    originals = []
    device = next(hf.parameters()).device
    try:
        hf.eval()
        if float64:
            for tensor in (*hf.parameters(), *hf.buffers()):
                if tensor.is_floating_point() and tensor.dtype != torch.float64:
                    originals.append((tensor, tensor.data))
                    tensor.data = tensor.data.to(torch.float64)
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        for tensor, data in originals:
            tensor.data = data
        for module, mode in modes:
            module.training = mode


def _agree(a: Tensor, b: Tensor) -> bool:
    """Equal up to float64 round-off (probes compare float64 computations)."""
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-9))


def _head_is_exact(hf: PreTrainedModel) -> bool:
    """Whether hf's logits are exactly head(backbone(x)) — checked once per model object on a
    4-token input in eval mode and float64 (soft-capping or logit scaling would fail it)."""
    cached = getattr(hf, "_rlhf_head_is_exact", None)
    if cached is not None:
        return cached
    if hf.base_model is hf or hf.get_output_embeddings() is None:  # no backbone + head to call
        hf._rlhf_head_is_exact = False
        return False
    device = next(hf.parameters()).device
    ids = torch.arange(4, device=device)[None] % hf.get_input_embeddings().num_embeddings
    try:
        with probing(hf, float64=True):
            whole = hf(input_ids=ids).logits
            split = hf.get_output_embeddings()(hf.base_model(input_ids=ids).last_hidden_state)
            exact = _agree(whole, split)
    except Exception:  # an unusual architecture: use its own forward
        exact = False
    hf._rlhf_head_is_exact = bool(exact)
    return hf._rlhf_head_is_exact


# ---- shared prefixes ---------------------------------------------------------------------------


def _shared_prefix_states(hf, input_ids: Tensor, attention_mask: Tensor, k: int, width: int):
    """Backbone states [B, T − Tp + 1, H] at columns Tp−1 … T−1 of k-row groups sharing [:Tp].

    The prompt [G, Tp] (left-padded) runs once per group with a cache; the cache is expanded to the
    B = G·k rows and the responses [B, T − Tp] run against it, positions continuing the prompt's.
    """
    backbone = hf.base_model
    prompt, prompt_mask = input_ids[::k, :width], attention_mask[::k, :width]  # [G, Tp]
    first = backbone(
        input_ids=prompt,
        attention_mask=prompt_mask,
        position_ids=position_ids(prompt_mask),
        use_cache=True,
    )
    cache = _cache_of(first)
    cache.batch_repeat_interleave(k)  # [G, …] -> [B, …], rows grouped as the input's
    start = prompt_mask.sum(-1).repeat_interleave(k)[:, None]  # [B, 1] real prompt tokens
    positions = start + torch.arange(input_ids.shape[1] - width, device=input_ids.device)
    second = backbone(
        input_ids=input_ids[:, width:],
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        **{_cache_kwarg(backbone): cache},
    )
    last_prompt = first.last_hidden_state[:, -1:].repeat_interleave(k, dim=0)  # [B, 1, H]
    return torch.cat([last_prompt, second.last_hidden_state], dim=1)


def _left_zeros(tail: Tensor, columns: int) -> Tensor:
    return torch.cat([tail.new_zeros(tail.shape[0], columns, tail.shape[2]), tail], dim=1)


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _cache_kwarg(backbone) -> str:
    try:
        names = inspect.signature(backbone.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in names else "past_key_values"


_SAID: set[str] = set()


def _fall_back(hf, why: str) -> bool:
    name = type(hf).__name__
    if name + why not in _SAID:
        _SAID.add(name + why)
        print(f"[shared-prefix] {name}: {why}; using the plain forward (same numbers, more work)")
    return False


def _can_share(hf, input_ids: Tensor, shared_prefix: tuple[int, int]) -> bool:
    """Whether this call may take the shared-prefix path (else the plain one, said once)."""
    k, width = shared_prefix
    rows, columns = input_ids.shape
    if k < 2 or rows % k or not 0 < width < columns:
        return False
    grouped = input_ids[:, :width].view(rows // k, k, width)
    if not bool((grouped == grouped[:, :1]).all()):  # rows of a group must share the prompt
        return False
    checkpointed = any(
        getattr(m, "gradient_checkpointing", False) and m.training for m in hf.modules()
    )
    if torch.is_grad_enabled() and checkpointed:
        return _fall_back(hf, "activation checkpointing drops the cache in the backward pass")
    return _shared_prefix_is_exact(hf)


def _shared_prefix_is_exact(hf) -> bool:
    """A one-time probe per model object: shared-prefix states equal the plain pass's in float64
    (eval mode, 2 prompts × 2 responses, one prompt left-padded): the same computation, whatever
    round-off the model's own dtype and depth add to each (`probing`)."""
    cached = getattr(hf, "_rlhf_shared_prefix_is_exact", None)
    if cached is not None:
        return cached
    device = next(hf.parameters()).device
    vocab, pad = hf.get_input_embeddings().num_embeddings, hf.config.pad_token_id
    tokens = [i for i in range(1, 12) if i != pad and i < vocab]
    ids = torch.tensor([tokens[:7]] * 2 + [tokens[3:10]] * 2, device=device)  # [4, 7], Tp = 4
    mask = torch.ones_like(ids)
    mask[2:, :1] = 0  # the second prompt is left-padded
    mask[1, 6:] = 0  # a response that ended early
    exact = False
    try:
        with probing(hf, float64=True):
            plain = hf.base_model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)
            ).last_hidden_state[:, 3:]
            shared = _shared_prefix_states(hf, ids, mask, 2, 4)
        real = mask[:, 3:].bool()
        exact = _agree(plain[real], shared[real])
        why = "its shared-prefix states differ from the plain pass"
    except Exception as err:  # no external cache, or another cache layout
        why = f"it cannot run a prompt's cache against its responses ({type(err).__name__})"
    hf._rlhf_shared_prefix_is_exact = exact or _fall_back(hf, why)
    return hf._rlhf_shared_prefix_is_exact
