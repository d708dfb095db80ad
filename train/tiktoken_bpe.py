"""tiktoken BPE files (``<base64 token> <rank>`` lines) as a ``tokenizers`` byte-level BPE.

tiktoken is not installed here, so a ranks file (OpenAI's ``cl100k_base.tiktoken``, Llama 3's
``tokenizer.model``) is loaded the way transformers' ``TikTokenConverter`` converts one: each
token's bytes become a string through GPT-2's byte-to-unicode table (the byte-level
alphabet); the merges are every split of a token into two tokens, ordered by the merged token's
rank; ``ignore_merges`` makes a pre-token that is itself a token one id, as tiktoken does. The
pre-tokenizer splits with tiktoken's ``cl100k_base`` pattern (also Llama 3's), then maps bytes to
the alphabet. tiktoken encodes each piece by repeatedly merging the adjacent pair whose
concatenation has the lowest rank; ``tests/unit/test_tiktoken_bpe.py`` checks the ids against a
direct implementation of that rule.

Limits, said plainly: the split pattern is fixed (an ``o200k_base`` file, whose pattern differs,
would be split differently), and a ranks file has no special tokens, so ``<|endoftext|>`` is added
after the last rank as the end-of-document token (GPT-2's convention; cl100k_base puts it one id
later, Llama 3 names it differently). Ranks must be ``0..N-1`` and include all 256 single bytes.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from models.errors import DataError

CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EOS = "<|endoftext|>"
_FIX = "pass a tiktoken BPE file ('<base64 token> <rank>' lines), a tokenizer.json or 'bytes'"


def looks_like_tiktoken(path: Path) -> bool:
    """The file starts with a ``<base64> <integer>`` line (a sentencepiece model is protobuf)."""
    with path.open("rb") as f:
        first = f.readline(4096).split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def read_ranks(path: Path) -> dict[bytes, int]:
    """``{token bytes: rank}`` of a tiktoken file; a bad line fails naming the file and line."""
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (binascii.Error, ValueError):
                raise DataError(
                    f"{path}:{lineno}: not a '<base64 token> <rank>' line: {_FIX}"
                ) from None
            if token in ranks:
                raise DataError(f"{path}:{lineno}: token listed twice: {_FIX}")
            ranks[token] = rank
    _check_ranks(path, ranks)
    return ranks


def _check_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once: {_FIX}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} of the 256 single bytes have no rank (first: {missing[0]}): "
            f"a byte-level BPE needs them all; {_FIX}"
        )


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (``bytes_to_unicode``), which ``tokenizers``'
    ByteLevel pre-tokenizer applies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges of ``ranks`` (transformers' ``TikTokenConverter`` rule)."""
    alphabet = byte_alphabet()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(text(a), text(b)) for *_, a, b in merges]


def load_tiktoken(path: Path, pattern: str = CL100K_PATTERN) -> Any:
    """A ``tokenizers.Tokenizer`` encoding like tiktoken with ``path``'s ranks, ``EOS`` added
    at id ``len(ranks)``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = vocab_and_merges(read_ranks(path))
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    return tok
