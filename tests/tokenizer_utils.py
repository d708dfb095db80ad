"""Byte-level BPE tokenizers trained in tests with ``tokenizers`` on given text (no download)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def train_byte_bpe(
    texts: Sequence[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    split_pattern: str | None = None,
) -> Any:
    """A ``tokenizers.Tokenizer``: byte-level BPE (all 256 bytes in its alphabet) trained on
    ``texts``. ``split_pattern``: pre-split with this regex (tiktoken style) instead of the
    ByteLevel pre-tokenizer's own GPT-2 split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if split_pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok
