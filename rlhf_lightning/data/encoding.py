"""One tokenisation convention for every stage, read from the checkpoint's own tokenizer.

A sequence is `prefix + prompt` then `response + end`, prompt and response tokenised separately
(as TRL does), so the boundary between them is exact and the response mask needs no guessing:

- prefix: what `tokenizer(text)` puts before the text's tokens — Llama's and the tiny tokenizer's
  `<s>`, OPT's `</s>`, nothing for GPT-2, Pythia or Qwen2 (`Layout.prefix`). It is not added
  again to a prompt that already starts with it (a chat template that writes `bos_token`). An
  empty prompt under a tokenizer that adds nothing starts from BOS, else EOS (GPT-2 opens a
  document with the `<|endoftext|>` that closes one), so a response always has a context.
- end: a response ends at a stop token — EOS or the chat template's end of turn (`<|im_end|>`,
  `Layout.stops`). A text that already ends with one gets nothing more, and what a template writes
  after its last end of turn (`<|im_end|>\\n`) is dropped when it is only whitespace, since
  generation stops at that token; any other text gets EOS appended.
  A response the policy did not end (cut at `max_new_tokens`, `ended` False) gets nothing
  appended: the reward model scores an unfinished response as unfinished.
- prompt length: the policy and the reward model cut a long prompt by one rule, from the left
  (`batching.truncate`): the RM at its `max_length`, the policy at `max_prompt_length`
  (`fit_prompts`, which hands the cut TEXT on, so the reward scores what the policy saw).

SFT, the reward model and the policy all encode text this way, so a policy sample decoded to text
(`generation.sampling.decode_responses`) and encoded again has the ids the reward model was trained
on for that text; generation stops at `stop_token_ids` (the stops plus the ids of the
checkpoint's `generation_config.json`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from rlhf_lightning.data.batching import truncate

_PROBE = "Hello world, 42 times."  # plain text every usable tokenizer turns into tokens


@dataclass(frozen=True)
class Layout:
    """What a tokenizer adds around text. prefix: the ids `tokenizer(text)` puts first. eos: the
    id appended to close a response. stops: ids a response may end with (EOS first, then the chat
    template's end of turn when it has another)."""

    prefix: tuple[int, ...]
    eos: int | None
    stops: tuple[int, ...]


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layout(tokenizer: PreTrainedTokenizerBase) -> Layout:
    """The tokenizer's `Layout`, worked out once per tokenizer (again if its template changes)."""
    key = (tokenizer.chat_template, tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer))
    cached = _LAYOUTS.get(tokenizer)
    if cached is None or cached[0] != key:
        eos = tokenizer.eos_token_id
        stops = dict.fromkeys(([eos] if eos is not None else []) + _end_of_turn(tokenizer))
        cached = key, Layout(_prefix(tokenizer), eos, tuple(stops))
        _LAYOUTS[tokenizer] = cached
    return cached[1]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config=None) -> list[int]:
    """Every id generation stops at: the layout's stops, then the `eos_token_id` (an int or a list)
    of `generation_config` (the checkpoint's `generation_config.json`) when given."""
    extra = getattr(generation_config, "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return list(dict.fromkeys([*layout(tokenizer).stops, *extra]))


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt: the tokenizer's prefix (BOS where it adds one), then the prompt."""
    return _open(layout(tokenizer), tokenizer(prompt, add_special_tokens=False)["input_ids"])


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """`encode_prompt` of each prompt, in one batched tokenizer call (each distinct text once)."""
    unique = list(dict.fromkeys(prompts))
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
    lay = layout(tokenizer)
    encoded = {text: _open(lay, x) for text, x in zip(unique, ids, strict=True)}
    return [encoded[p] for p in prompts]


def encode_response(
    tokenizer: PreTrainedTokenizerBase, response: str, eos: bool = True
) -> list[int]:
    """Token ids of a response, ended at a stop token (module docstring); `eos=False` leaves the
    ids as the text gives them (fixed-length responses, responses cut at `max_new_tokens`)."""
    return encode_responses(tokenizer, [response], eos)[0]


def encode_responses(
    tokenizer: PreTrainedTokenizerBase, responses: list[str], eos: bool | Sequence[bool] = True
) -> list[list[int]]:
    """`encode_response` of each response, in one batched tokenizer call; `eos` per response
    when a sequence (a rollout's `ended`)."""
    ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    closes = [bool(eos)] * len(ids) if isinstance(eos, bool) else [bool(e) for e in eos]
    if len(closes) != len(ids):
        raise ValueError(f"{len(closes)} eos flags for {len(ids)} responses")
    lay = layout(tokenizer)
    return [
        _close(tokenizer, lay, list(x)) if c else list(x) for x, c in zip(ids, closes, strict=True)
    ]


def encode_sequences(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    ended: Sequence[bool] | None = None,
    on_cut: Callable[[int], None] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of each pair, truncated to `max_length` by the shared policy
    (`batching.truncate`: the prefix stays first, a cut response keeps its stop token).
    `ended` [B]: False where the response was cut at `max_new_tokens` (no EOS appended; None:
    every response ended). `on_cut(length)` is called with the full length of each cut pair."""
    lay = layout(tokenizer)
    eos = True if ended is None else [bool(e) for e in ended]
    pairs = zip(encode_prompts(tokenizer, prompts), encode_responses(tokenizer, responses, eos))
    out = []
    for p, r in pairs:
        out.append(truncate(p, r, max_length, lay.stops, head=_head(lay, p)))
        if on_cut is not None and len(p) + len(r) > max_length:
            on_cut(len(p) + len(r))
    return out


def fit_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int | None
) -> tuple[list[str], int]:
    """(each prompt whose ids fit `max_length`, else the text of its ids cut from the left by
    the RM's rule (`batching.truncate`: the prefix stays, the words nearest the response are
    kept), the number cut). The cut is moved right until the text's own ids fit, since the
    policy and the reward both encode this text again."""
    if max_length is None:
        return list(prompts), 0
    lay, cache = layout(tokenizer), {}
    for text, ids in zip(prompts, encode_prompts(tokenizer, list(prompts)), strict=True):
        if len(ids) > max_length and text not in cache:
            cache[text] = _cut_prompt(tokenizer, lay, ids, max_length)
    return [cache.get(p, p) for p in prompts], sum(p in cache for p in prompts)


def _cut_prompt(tokenizer, lay: Layout, ids: list[int], max_length: int) -> str:
    head = _head(lay, ids)
    kept, _ = truncate(ids, [], max_length, lay.stops, head=head)
    tail = kept[head:]
    while tail:
        text = tokenizer.decode(tail)
        if len(encode_prompt(tokenizer, text)) <= max_length:
            return text
        tail = tail[1:]
    return ""


def _open(lay: Layout, ids: list[int]) -> list[int]:
    ids, prefix = list(ids), list(lay.prefix)
    if not ids and not prefix:  # nothing to condition the first response token on
        return [lay.eos] if lay.eos is not None else []
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def _head(lay: Layout, prompt: list[int]) -> int:
    """Leading prompt ids truncation never cuts: the tokenizer's prefix, when the prompt has it."""
    n = len(lay.prefix)
    return n if prompt[:n] == list(lay.prefix) else 0


def _close(tokenizer, lay: Layout, ids: list[int]) -> list[int]:
    """`ids` ending at their last stop token when only whitespace follows it, else + EOS."""
    if lay.stops and not set(lay.stops).isdisjoint(ids):
        last = max(i for i, t in enumerate(ids) if t in lay.stops)
        if not tokenizer.decode(ids[last + 1 :]).strip():
            return ids[: last + 1]
    return ids + [lay.eos] if lay.eos is not None else ids


def _prefix(tokenizer) -> tuple[int, ...]:
    """The ids `tokenizer(text)` adds before the text's own (found around a probe text)."""
    full = list(tokenizer(_PROBE)["input_ids"])
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start : start + len(plain)] == plain:
            return tuple(full[:start])
    bos = tokenizer.bos_token_id
    return (bos,) if bos is not None and full[:1] == [bos] else ()


def _end_of_turn(tokenizer) -> list[int]:
    """The special token a chat template closes an assistant turn with (`<|im_end|>`), if any:
    the first special id in what the template writes after a probe reply."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    from rlhf_lightning.data.chat import render_completion
    from rlhf_lightning.data.sources import RowError

    reply = "Fine, thanks."
    prompt = [{"role": "user", "content": "How are you?"}]
    try:
        text = render_completion(prompt, [{"role": "assistant", "content": reply}], tokenizer, "")
    except RowError:
        return []  # a template that cannot render the probe fails on the data with its own line
    tail = text[text.rfind(reply) + len(reply) :] if reply in text else ""
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special |= {i for i, t in added.items() if t.special}
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    return [next(i for i in ids if i in special)] if special.intersection(ids) else []
