"""An offline tokenizer for the tiny models: byte-level BPE trained on the task's corpus.

Byte-level means every UTF-8 string encodes (unknown words fall back to their bytes), so a tiny
model also trains on a user's own files; BPE merges learnt on the task corpus make each of the
task's words one token, which keeps sequences short on CPU. Saved and loaded in Hugging Face
format (`PreTrainedTokenizerFast`), so transformers alone reads it back.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` (no download) and wrap it for transformers.

    The 256 byte symbols are always in the vocabulary; `vocab_size` bounds the merges on top.
    Padding is on the right; `<pad>` is its own token so the reward model's "last real token"
    (the last non-pad position) is never confused with text.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[PAD, BOS, EOS],
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    # `tokenizer(text)` gives `<s> text </s>`: the framework's own encoding (data/encoding.py), so a
    # user scoring text with transformers alone feeds the reward model exactly what it was trained on.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, backend.token_to_id(BOS)), (EOS, backend.token_to_id(EOS))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    tokenizer.padding_side = "right"
    return tokenizer
