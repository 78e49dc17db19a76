"""One tokenisation convention for every stage: `[bos] + prompt` then `response + [eos]`.

Prompt and response are tokenised separately and concatenated (as TRL does), so the boundary
between them is exact and the response mask needs no guessing. SFT, the reward model and the
policy all encode text this way, which is what makes their log-probabilities and scores agree.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt: BOS (when the tokenizer has one) followed by the prompt's tokens."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def encode_response(
    tokenizer: PreTrainedTokenizerBase, response: str, eos: bool = True
) -> list[int]:
    """Token ids of a response, closed by EOS unless `eos=False` (fixed-length responses)."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """`encode_prompt` of each prompt, in one batched tokenizer call (each distinct text once)."""
    unique = list(dict.fromkeys(prompts))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
    encoded = {text: bos + list(x) for text, x in zip(unique, ids, strict=True)}
    return [encoded[p] for p in prompts]


def encode_responses(
    tokenizer: PreTrainedTokenizerBase, responses: list[str], eos: bool = True
) -> list[list[int]]:
    """`encode_response` of each response, in one batched tokenizer call."""
    end = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    return [list(x) + end for x in ids]
