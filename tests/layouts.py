"""Offline checkpoints in the layouts users bring: GPT-2, Pythia (GPT-NeoX), Qwen2, OPT, SmolLM2.

Each is a byte-level BPE trained here with `tokenizers` on the test's texts, wrapped in its
family's transformers tokenizer class with that family's special tokens, and a model with random
weights from a small config (hidden 32, one layer), both saved with `save_pretrained` into a
folder, as a downloaded checkpoint is:

| layout | BOS (what `tokenizer(text)` adds) | EOS | pad | chat template | positions |
|---|---|---|---|---|---|
| gpt2   | none (bos = eos = `<|endoftext|>`) | `<|endoftext|>` | none | none | learned |
| pythia | none (bos = eos = `<|endoftext|>`) | `<|endoftext|>` | none | none | rotary, embeddings > vocab |
| qwen2  | none (no BOS token) | `<|im_end|>` | `<|endoftext|>` | ChatML, `<|im_end|>\\n` | rotary; generation_config eos [`<|im_end|>`, `<|endoftext|>`] |
| opt    | `</s>` (bos = eos = `</s>`) | `</s>` | `<pad>` | none | learned (offset 2) |
| smollm2 | none (bos `<|im_start|>` not added) | `<|im_end|>` | `<|im_end|>` (pad = eos) | ChatML with a default system prompt | rotary (Llama), tied; generation_config.json |

`smollm2` is SmolLM2-135M-Instruct's layout (a Llama whose pad token is its EOS); it is not in
`LAYOUTS` (the stage-by-stage runs over those four), tests that need pad == eos name it
(`PAD_IS_EOS`).

`broken(kind, …)` builds the bad checkpoints start-up must refuse.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

LAYOUTS = ("gpt2", "pythia", "qwen2", "opt")
PAD_IS_EOS = "smollm2"  # pad = eos = `<|im_end|>`, as SmolLM2-135M-Instruct ships
EOT = "<|endoftext|>"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_WITH_SYSTEM = (  # SmolLM2-Instruct's template: a default system turn when none is given
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMALL = dict(hidden=32, layers=1, heads=2, inner=64, positions=256)


def train_bpe(texts: Iterable[str], specials: list[str], vocab_size: int = 400):
    """(vocab, merges) of a byte-level BPE trained on `texts`, special tokens first."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer)
    model = json.loads(backend.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def tokenizer_of(name: str, texts: Iterable[str]):
    """The layout's tokenizer, trained on `texts`."""
    if name == "gpt2":
        vocab, merges = train_bpe(texts, [EOT])
        return GPT2Tokenizer(vocab=vocab, merges=merges, pad_token=None)
    if name == "pythia":
        vocab, merges = train_bpe(texts, [EOT, "<|padding|>"])
        return GPTNeoXTokenizer(vocab=vocab, merges=merges, pad_token=None)
    if name == "qwen2":
        vocab, merges = train_bpe(texts, [EOT, "<|im_start|>", "<|im_end|>"])
        tokenizer = Qwen2Tokenizer(
            vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token=EOT, unk_token=None
        )
        turns = [AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")]
        tokenizer.add_tokens(turns, special_tokens=True)  # as Qwen2's tokenizer.json lists them
        tokenizer.chat_template = CHATML
        return tokenizer
    if name == "smollm2":  # ids as SmolLM2's: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2
        vocab, merges = train_bpe(texts, [EOT, "<|im_start|>", "<|im_end|>"])
        tokenizer = GPT2Tokenizer(
            vocab=vocab,
            merges=merges,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            unk_token=EOT,
        )
        turns = [AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")]
        tokenizer.add_tokens(turns, special_tokens=True)
        tokenizer.chat_template = CHATML_WITH_SYSTEM
        return tokenizer
    if name == "opt":  # OPT's ids: <s> 0, <pad> 1, </s> 2; its tokenizer prepends </s>
        vocab, merges = train_bpe(texts, ["<s>", "<pad>", "</s>", "<unk>"])
        return GPT2Tokenizer(
            vocab=vocab,
            merges=merges,
            bos_token="</s>",
            eos_token="</s>",
            unk_token="</s>",
            pad_token="<pad>",
            add_bos_token=True,
        )
    raise ValueError(f"unknown layout {name!r}")


def model_of(name: str, tokenizer, rows: int | None = None):
    """A causal LM of the layout with random weights; `rows`: embedding rows (default: vocab)."""
    n = len(tokenizer) if rows is None else rows
    h, layers, heads, inner, positions = SMALL.values()
    if name == "gpt2":
        eos = tokenizer.eos_token_id
        config = GPT2Config(
            vocab_size=n,
            n_embd=h,
            n_layer=layers,
            n_head=heads,
            n_positions=positions,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        return GPT2LMHeadModel(config)
    if name == "pythia":  # Pythia pads its embeddings past the vocabulary (50304 > 50277)
        eos = tokenizer.eos_token_id
        config = GPTNeoXConfig(
            vocab_size=n if rows is not None else -(-n // 64) * 64,
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inner,
            max_position_embeddings=positions,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        return GPTNeoXForCausalLM(config)
    if name == "qwen2":
        config = Qwen2Config(
            vocab_size=n,
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            intermediate_size=inner,
            max_position_embeddings=positions,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return Qwen2ForCausalLM(config)
    if name == "opt":
        config = OPTConfig(
            vocab_size=n,
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=inner,
            word_embed_proj_dim=h,
            max_position_embeddings=positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return OPTForCausalLM(config)
    if name == "smollm2":
        config = LlamaConfig(
            vocab_size=n,
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            intermediate_size=inner,
            max_position_embeddings=positions,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return LlamaForCausalLM(config)
    raise ValueError(f"unknown layout {name!r}")


def save_checkpoint(name: str, texts: Iterable[str], directory: Path, seed: int = 0) -> Path:
    """Tokenizer + random-weight model of layout `name`, saved into `directory`."""
    tokenizer = tokenizer_of(name, texts)
    torch.manual_seed(seed)
    model = model_of(name, tokenizer)
    if name == "qwen2":  # as Qwen2-Instruct ships: generation stops at either id
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", EOT)]
        model.generation_config = GenerationConfig(
            eos_token_id=ids, pad_token_id=tokenizer.pad_token_id
        )
    if name == "smollm2":  # as SmolLM2-Instruct's generation_config.json
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def with_generation_config(source: Path, directory: Path, **settings) -> Path:
    """A copy of checkpoint `source` whose generation_config.json also sets `settings`
    (repetition_penalty, top_k, …), as Hub checkpoints ship them."""
    shutil.copytree(source, directory)
    path = Path(directory) / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **settings}, indent=2))
    return Path(directory)


def broken(kind: str, texts: Iterable[str], directory: Path) -> Path:
    """A checkpoint start-up must refuse: no_tokenizer (config.json and weights only),
    no_weights (config.json and tokenizer only), no_tokens (a tokenizer with no token for any
    text), small_embeddings (fewer embedding rows than tokens)."""
    texts = list(texts)
    if kind == "no_tokens":  # a BPE holding only <|endoftext|>: every byte is unknown, dropped
        tokenizer = GPT2Tokenizer(vocab={EOT: 0}, merges=[])
        model = model_of("gpt2", tokenizer, rows=8)
    else:
        tokenizer = tokenizer_of("gpt2", texts)
        rows = len(tokenizer) - 10 if kind == "small_embeddings" else None
        model = model_of("gpt2", tokenizer, rows=rows)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if kind == "no_tokenizer":
        for path in directory.iterdir():
            if path.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat")):
                path.unlink() if path.is_file() else shutil.rmtree(path)
    if kind == "no_weights":
        for path in directory.glob("*.safetensors"):
            path.unlink()
    return directory
