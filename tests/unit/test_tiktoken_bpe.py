"""tiktoken BPE files through ``tokenizers`` (``train/tiktoken_bpe.py``), without tiktoken.

The ranks file is written here from a byte-level BPE trained with ``tokenizers`` on stdlib text
(the ``json`` and ``email`` packages). The reference is tiktoken's own rule, implemented
directly below as tiktoken's ``_educational.bpe_encode``: split with the pattern, a piece that
is a token is one id, else merge the adjacent pair of lowest rank until none is a token.
"""

from __future__ import annotations

import base64
import itertools
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import regex

from models.errors import DataError
from tests.tokenizer_utils import train_byte_bpe
from train.prepare import main
from train.tiktoken_bpe import CL100K_PATTERN, EOS, load_tiktoken, read_ranks
from train.tokenizer import load_tokenizer

STDLIB = Path(json.__file__).parent.parent
HELD_OUT = (
    textwrap.__file__,
    "naïve café ☃ 日本語 — ÆØÅ\r\n\r\n  tabs\t\tand   spaces  \n123456789 it's WE'LL 'Ve",
)


def _train_text() -> list[str]:
    files = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))
    return [p.read_text() for p in files]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """(ranks file, the tokenizers BPE it was written from): ranks are the BPE's ids in order,
    its special token left out."""
    tok = train_byte_bpe(_train_text(), 700, ["<|special|>"], CL100K_PATTERN)
    decode = {c: b for b, c in _alphabet().items()}
    vocab = sorted((i, s) for s, i in tok.get_vocab().items() if s != "<|special|>")
    path = tmp_path_factory.mktemp("tt") / "bpe.tiktoken"
    lines = [
        f"{base64.b64encode(bytes(decode[c] for c in s)).decode()} {rank}"
        for rank, (_, s) in enumerate(vocab)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path, tok


def _alphabet() -> dict[int, str]:
    from train.tiktoken_bpe import byte_alphabet

    return byte_alphabet()


def tiktoken_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's rule, directly (its ``_educational.py``, plus the whole-piece shortcut of its
    ``CoreBPE``)."""
    ids: list[int] = []
    for piece in regex.findall(CL100K_PATTERN, text):
        data = piece.encode("utf-8")
        if data in ranks:
            ids.append(ranks[data])
            continue
        parts = [bytes([b]) for b in data]
        while True:
            pairs = enumerate(itertools.pairwise(parts))
            found = [(ranks[a + b], i) for i, (a, b) in pairs if a + b in ranks]
            rank, i = min(found, default=(None, 0))
            if rank is None:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


def _held_out() -> list[str]:
    return [Path(HELD_OUT[0]).read_text(), HELD_OUT[1]]


def test_ids_equal_tiktoken_rule_and_the_source_bpe(trained) -> None:
    path, source = trained
    ranks = read_ranks(path)
    tok = load_tiktoken(path)
    total = 0
    for text in _held_out():
        got = tok.encode(text, add_special_tokens=False).ids
        assert got == tiktoken_encode(ranks, text)
        # the BPE the ranks came from: its ids are the ranks shifted by its one special token
        assert got == [i - 1 for i in source.encode(text).ids]
        assert tok.decode(got) == text
        total += len(got)
    assert total > 1000 and len(set(tok.encode(_held_out()[0]).ids)) > 300
    assert tok.token_to_id(EOS) == len(ranks) == 699


def test_prepare_with_a_tiktoken_file(trained, tmp_path: Path) -> None:
    path, _ = trained
    src = tmp_path / "src"
    src.mkdir()
    docs = [f"def f{i}(x):\n    return x * {i}  # naïve\n" for i in range(40)]
    for i, d in enumerate(docs):
        (src / f"{i:02d}.py").write_text(d)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--quiet", "--tokenizer", str(path), "--val-fraction", "0.2"]
    assert main([*argv, str(src)]) == 0  # 40 files x 0.2: split by document
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "tiktoken"
    assert meta["vocab_size"] == 700 and meta["eos_id"] == 699
    tok = load_tiktoken(path)
    got = []
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
        assert ids[-1] == 699
        got += tok.decode(ids, skip_special_tokens=False).split(EOS)[:-1]
    assert sorted(got) == sorted(docs)
    # Llama 3 ships its tiktoken ranks as tokenizer.model: recognised by content
    model = tmp_path / "tokenizer.model"
    model.write_bytes(path.read_bytes())
    spec, loaded = load_tokenizer(str(model))
    assert spec.kind == "tiktoken" and loaded.vocab_size == 700


def test_bad_tiktoken_files_name_the_file_and_line(trained, tmp_path: Path) -> None:
    path, _ = trained
    lines = path.read_text().splitlines()
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("\n".join([*lines[:5], "not-base64!! 5", *lines[6:]]) + "\n")
    with pytest.raises(DataError, match=r"bad.tiktoken:6: not a '<base64 token> <rank>' line"):
        load_tiktoken(bad)
    bad.write_text("\n".join(lines[1:]) + "\n")  # the first token dropped: ranks start at 1
    with pytest.raises(DataError, match=r"bad.tiktoken: the ranks are not 0..697, each once"):
        load_tiktoken(bad)
    renumbered = [f"{ln.split()[0]} {i}" for i, ln in enumerate(lines[1:])]
    bad.write_text("\n".join(renumbered) + "\n")
    with pytest.raises(DataError, match=r"1 of the 256 single bytes have no rank \(first: "):
        load_tiktoken(bad)
