"""Token data: memory-mapped shards and a loader whose global batch ignores the parallel layout.

Format (nanoGPT/Megatron users already have it): ``train.bin`` and ``val.bin`` hold a flat
array of uint16 or uint32 token ids, ``meta.json`` says which dtype and vocabulary. ``python -m
train.prepare`` writes them from text files; the default ``stdlib`` corpus is written the same
way from the Python standard library's own sources on first use (it ships with Python: no
download).

Sample ``i`` is the window ``tokens[i*S : i*S + S + 1]`` (inputs and shifted targets). The order
of samples is a seeded permutation per epoch. Step ``k`` consumes global samples
``[k*G, (k+1)*G)`` of that order; micro-batch ``m`` of data-parallel rank ``r`` of ``dp`` is
rows ``(m*dp + r)*mb ...`` of the step (``micro_batch_offset``). The position is a count of *global* samples,
so a checkpoint resumes with the same samples on another data-parallel size.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.errors import DataError

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
BYTE_VOCAB = 256
"""Vocabulary of byte-level shards (the stdlib corpus, ``--tokenizer bytes``)."""


# -- shards on disk ----------------------------------------------------------------------------
def write_shards(
    out: Path, train: np.ndarray, val: np.ndarray, vocab_size: int, source: str
) -> None:
    """Write ``train.bin``/``val.bin``/``meta.json`` atomically (meta.json last)."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    for name, arr in (("train", train), ("val", val)):
        tmp = out / f".{name}.bin.{os.getpid()}"
        arr.astype(DTYPES[dtype]).tofile(tmp)
        os.replace(tmp, out / f"{name}.bin")
    meta = {
        "dtype": dtype,
        "vocab_size": vocab_size,
        "tokenizer": "bytes",
        "source": source,
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
    }
    tmp = out / f".meta.json.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")


def collect_text_files(inputs: list[Path], suffixes: tuple[str, ...] = (".py",)) -> list[Path]:
    """Files under ``inputs`` (recursively for folders), sorted for determinism."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes]
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input path {p} does not exist")
    return sorted(set(files))


def split_bytes(
    files: list[Path], root: Path | None, val_fraction: float, max_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Byte-tokenise ``files``; a file goes to validation when crc32 of its relative path says so."""
    train, val, total = [], [], 0
    for f in files:
        rel = str(f.relative_to(root)) if root else f.name
        data = f.read_bytes()
        if max_bytes and total + len(data) > max_bytes:
            continue
        total += len(data)
        is_val = (zlib.crc32(rel.encode()) % 10_000) < val_fraction * 10_000
        (val if is_val else train).append(np.frombuffer(data, dtype=np.uint8))
    if not train or not val:
        raise DataError("too few input files to make both a train and a validation split")
    return np.concatenate(train), np.concatenate(val)


def prepare_stdlib(out: Path, max_bytes: int, val_fraction: float) -> Path:
    """Write the stdlib byte corpus to ``out`` unless it is already there."""
    if (out / "meta.json").exists():
        return out
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in collect_text_files([root]) if "site-packages" not in f.parts]
    train, val = split_bytes(files, root, val_fraction, max_bytes)
    write_shards(out, train, val, BYTE_VOCAB, f"python-stdlib:{root}")
    return out


def read_meta(folder: Path) -> dict:
    """``folder/meta.json``, or a one-line DataError naming the file."""
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}): re-run `python -m train.prepare`") from None
    if meta.get("dtype") not in DTYPES:
        raise DataError(f"{path}: dtype {meta.get('dtype')!r} is not uint16 or uint32")
    return meta


def verify_shards(folder: Path) -> dict:
    """Check ``train.bin``/``val.bin`` against ``meta.json`` by size (no bytes are read): each
    exists, is non-empty, is a whole number of tokens, and holds the token count meta.json
    records (a truncated copy would otherwise train silently on less data). Returns meta."""
    meta = read_meta(folder)
    itemsize = np.dtype(DTYPES[meta["dtype"]]).itemsize
    fix = "re-run `python -m train.prepare` (or copy the folder again)"
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path} is missing: {fix}")
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{path} is empty: {fix}")
        if size % itemsize:
            raise DataError(
                f"{path} is {size} bytes, not a whole number of {meta['dtype']} tokens "
                f"({itemsize} bytes each): the file is damaged; {fix}"
            )
        want = meta.get(f"{split}_tokens")
        if want is not None and size // itemsize != int(want):
            raise DataError(
                f"{path} holds {size // itemsize} tokens but {folder / 'meta.json'} records "
                f"{split}_tokens={want}: the file is truncated or from another preparation; {fix}"
            )
    return meta


def resolve_data_dir(data: object) -> Path:
    """The shard folder for ``cfg.data``, preparing the stdlib corpus if needed; its shards
    are checked against ``meta.json`` (``verify_shards``)."""
    if data.name == "stdlib":
        path = Path(data.path or "data_cache/stdlib")
        verify_shards(prepare_stdlib(path, data.max_bytes, data.val_fraction))
        return path
    if data.name == "shards":
        path = Path(data.path)
        if not (path / "meta.json").is_file():
            raise DataError(
                f"data.path={data.path!r} has no meta.json: write shards with "
                "`python -m train.prepare --out DIR FILES...` and point data.path at DIR"
            )
        verify_shards(path)
        return path
    raise DataError(f"data.name={data.name!r} is unknown: use 'stdlib' or 'shards'")


@dataclass
class TokenShards:
    """A memory-mapped token split."""

    tokens: np.ndarray
    vocab_size: int

    @classmethod
    def open(cls, folder: Path, split: str) -> TokenShards:
        meta = read_meta(folder)
        dtype = meta["dtype"]
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path} is missing: re-run `python -m train.prepare`")
        return cls(np.memmap(path, dtype=DTYPES[dtype], mode="r"), int(meta["vocab_size"]))

    def num_samples(self, seq_len: int) -> int:
        return (len(self.tokens) - 1) // seq_len


# -- loader ------------------------------------------------------------------------------------
def micro_batch_offset(k: int, dp_rank: int, dp_size: int, micro_batch: int) -> int:
    """First row, within its global batch, of data-parallel rank ``dp_rank``'s micro-batch ``k``.

    Micro-batch ``k`` of every data-parallel rank together is global rows
    ``[k*dp*mb, (k+1)*dp*mb)``: the rows a single process with ``micro_batch = dp*mb`` sees in
    its micro-batch ``k``. So what depends on a micro-batch as a whole (the MoE global balancing
    loss, reduced over the data-parallel group) is the same on every layout of the same global
    micro-batch."""
    return (k * dp_size + dp_rank) * micro_batch


class TokenLoader:
    """Deterministic, layout-invariant batches for one data-parallel rank.

    Args:
        shards: the token split.
        seq_len: tokens per sample.
        global_batch: samples per optimizer step over all data-parallel ranks.
        micro_batch: samples per forward/backward on this rank.
        dp_rank, dp_size: this rank's data-parallel coordinate.
        seed: permutation seed; ``shuffle=False`` reads samples in order (validation).
    """

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.shards, self.seq_len = shards, seq_len
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.n = shards.num_samples(seq_len)
        if self.n < 1:
            raise DataError(f"the data has fewer than seq_len+1 = {seq_len + 1} tokens")
        self.consumed = 0
        self._epoch, self._perm = -1, None

    def _sample_index(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if not self.shuffle:
            return i
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=gen).numpy(), epoch
        return int(self._perm[i])

    def _read(self, globals_: range) -> torch.Tensor:
        S = self.seq_len
        rows = [
            self.shards.tokens[j * S : j * S + S + 1] for j in map(self._sample_index, globals_)
        ]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def micro_offset(self, k: int) -> int:
        """First row (within the global batch) of this rank's micro-batch ``k``."""
        return micro_batch_offset(k, self.dp_rank, self.dp_size, self.micro_batch)

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the next global batch: a list of (inputs_BS, targets_BS)."""
        n_micro = self.global_batch // self.dp_size // self.micro_batch
        out = []
        for k in range(n_micro):
            start = self.consumed + self.micro_offset(k)
            seq = self._read(range(start, start + self.micro_batch))
            out.append((seq[:, :-1], seq[:, 1:]))
        self.consumed += self.global_batch
        return out

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed_samples"])
        self.seed = int(state.get("seed", self.seed))
        self._epoch = -1
