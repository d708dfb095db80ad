"""Tokenize text into memory-mapped shards (``train.bin``, ``val.bin``, ``meta.json``).

    python -m train.prepare --tokenizer bytes --out data/mycorpus texts/ more.txt
    python -m train.prepare --tokenizer tok/tokenizer.json --out data/web web.jsonl.gz --workers 8
    python -m train.prepare --tokenizer sp.model --out data/wiki wiki/*.parquet --field content

Inputs are text files and folders (recursively, filtered by ``--suffix``), ``.jsonl``/``.jsonl.gz``
(one document per line, field ``--field``) and ``.parquet`` (one document per row, column
``--field``), read lazily (``train/corpus.py``). Tokenizers: ``bytes``, a Hugging Face
``tokenizer.json``, a sentencepiece ``.model`` (``train/tokenizer.py``). Every document is
followed by the tokenizer's EOS id (``bytes``: id 0, the NUL byte, which no accepted document
holds, so the vocabulary stays 256).

Split: a document goes to validation when crc32 of its key (its path relative to the inputs and
its index within the file) says so (``--val-fraction``), so adding files never reshuffles the
split. Text files alone, too few for that rule to be sure of validation documents (fewer than
``MIN_VAL_DOCS / --val-fraction``: one file, a folder of a few markdown files), are split by
bytes instead: the last ``--val-fraction`` of each file's UTF-8 bytes, cut at a character
boundary, is validation (a file too short to cut stays whole in train, unless it is the only
one).

Determinism: documents are cut into fixed batches of ``--batch-docs`` in input order, tokenized by
``--workers`` processes and written in order, so the bytes do not depend on the number of
workers. Resume: every ``--commit-batches`` batches the shards are fsynced and
``OUT/.prepare_state.json`` records the documents done and the bytes of each shard; a rerun with
the same arguments truncates the shards to those sizes and continues, giving the bytes an
uninterrupted run gives. ``meta.json`` is written last (atomically), only when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models.errors import DataError
from train.corpus import DEFAULT_SUFFIXES, Doc, collect_inputs, kind_of, read_documents
from train.tokenizer import Tokenizer, TokenizerSpec, load_tokenizer

STATE = ".prepare_state.json"
SPLITS = ("train", "val")
MIN_VAL_DOCS = 4  # expected validation documents below which text files are split by bytes


@dataclass
class PrepareArgs:
    """The command line, typed (see ``main`` for each flag's help)."""

    out: Path
    inputs: list[Path]
    tokenizer: str = "bytes"
    field: str = "text"
    suffixes: tuple[str, ...] = DEFAULT_SUFFIXES
    val_fraction: float = 0.05
    max_bytes: int = 0
    workers: int = 1
    dtype: str = "auto"
    eos_id: int | None = None
    batch_docs: int = 256
    commit_batches: int = 16
    quiet: bool = False


@dataclass
class SplitCounts:
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0


@dataclass
class Progress:
    """What ``.prepare_state.json`` records at a commit (and meta.json at the end)."""

    key: str
    docs_done: int = 0  # documents (pieces, for a byte-split file) of the stream written
    input_bytes: int = 0
    splits: dict[str, SplitCounts] = field(
        default_factory=lambda: {s: SplitCounts() for s in SPLITS}
    )

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "docs_done": self.docs_done,
            "input_bytes": self.input_bytes,
            "splits": {s: vars(c) for s, c in self.splits.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> Progress:
        splits = {s: SplitCounts(**d["splits"][s]) for s in SPLITS}
        return cls(d["key"], d["docs_done"], d["input_bytes"], splits)


# -- choices made before any work ------------------------------------------------------------
def choose_dtype(requested: str, vocab_size: int, name: str) -> str:
    """``auto``: uint16 up to 65,536 ids, else uint32; a too-small explicit dtype is refused."""
    if vocab_size > 2**32:
        raise DataError(f"tokenizer {name} has {vocab_size:,} ids, more than uint32 holds")
    if requested == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if requested == "uint16" and vocab_size > 2**16:
        raise DataError(
            f"tokenizer {name} has a vocabulary of {vocab_size:,}, which exceeds --dtype uint16 "
            "(65,536 ids): use --dtype uint32 or --dtype auto"
        )
    return requested


def choose_eos(tok: Tokenizer, eos_id: int | None, name: str) -> int:
    if eos_id is None:
        eos_id = tok.eos_id
    if eos_id is None:
        raise DataError(
            f"tokenizer {name} has no end-of-document token: pass --eos-id ID "
            "(an id below its vocabulary size)"
        )
    if not 0 <= eos_id < tok.vocab_size:
        raise DataError(
            f"--eos-id {eos_id} is not below tokenizer {name}'s vocabulary size {tok.vocab_size}"
        )
    return eos_id


def run_key(args: PrepareArgs, spec: TokenizerSpec, eos: int, dtype: str, files, root) -> str:
    """Hash of everything that decides the output bytes: a resume must match it."""
    stats = [
        (f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files
    ]
    what = [spec.identity(), eos, dtype, args.field, args.val_fraction, args.max_bytes, stats]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


# -- the document stream ---------------------------------------------------------------------
def split_by_document(docs: Iterable[Doc], val_fraction: float) -> Iterator[tuple[Doc, bool]]:
    for d in docs:
        yield d, (zlib.crc32(d.key.encode()) % 10_000) < val_fraction * 10_000


def split_by_bytes(
    docs: Iterable[Doc], val_fraction: float, single: bool = True
) -> Iterator[tuple[Doc, bool]]:
    """Each document in two: its last ``val_fraction`` of UTF-8 bytes is validation. A document
    too short to cut fails when it is the only one (``single``), else stays whole in train."""
    for d in docs:
        data = d.text.encode("utf-8")
        cut = len(data) - round(len(data) * val_fraction)
        while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:  # a continuation byte
            cut += 1
        if (cut == 0 or cut == len(data)) and not single:
            yield d, False
            continue
        if cut == 0 or cut == len(data):
            raise DataError(
                f"{d.where}: {len(data)} bytes are too few to split into train and validation "
                f"with --val-fraction {val_fraction}: give more text or another --val-fraction"
            )
        yield Doc(data[:cut].decode(), d.where, d.key + ":train", d.advance), False
        yield Doc(data[cut:].decode(), d.where, d.key + ":val", 0), True


def splits_by_bytes(files: list[Path], val_fraction: float) -> bool:
    """Text files only, too few to expect ``MIN_VAL_DOCS`` validation documents by document."""
    few = len(files) * val_fraction < MIN_VAL_DOCS
    return few and all(kind_of(f) == "text" for f in files)


def capped(stream: Iterable[tuple[Doc, bool]], max_bytes: int) -> Iterator[tuple[Doc, bool, int]]:
    """Adds each document's UTF-8 size; stops before the document that would pass ``max_bytes``."""
    total = 0
    for d, is_val in stream:
        n = len(d.text.encode("utf-8"))
        if max_bytes and total + n > max_bytes:
            return
        total += n
        yield d, is_val, n


# -- tokenizing (in worker processes) --------------------------------------------------------
class Encoder:
    """Batch of (text, is_val) -> (train ids, val ids) as arrays of the shard dtype, EOS after
    every document."""

    def __init__(self, tok: Tokenizer, eos: int, dtype: str) -> None:
        self.tok, self.eos, self.dtype = tok, eos, np.dtype(dtype)
        self.limit = int(np.iinfo(self.dtype).max)

    def __call__(self, batch: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tok.encode([t for t, _ in batch])
        out = []
        for want_val in (False, True):
            docs = [doc for doc, (_, v) in zip(ids, batch) if v == want_val]
            for doc in docs:  # fresh lists from the tokenizer: appending copies nothing
                doc.append(self.eos)
            n = sum(map(len, docs))
            arr = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=n)
            if arr.size and (arr.max() > self.limit or arr.min() < 0):
                raise DataError(
                    f"token id {int(arr.max())} does not fit the shard dtype {self.dtype.name}"
                )
            out.append(arr.astype(self.dtype))
        return out[0], out[1]


_ENCODER: Encoder | None = None


def _init_worker(spec: TokenizerSpec, eos: int, dtype: str) -> None:
    global _ENCODER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
    _ENCODER = Encoder(spec.load(), eos, dtype)


def _encode_in_worker(batch: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    return _ENCODER(batch)


def encoded(batches: Iterable, encoder: Encoder, spec: TokenizerSpec, workers: int) -> Iterator:
    """``(info, (train_ids, val_ids))`` per batch, in input order, with at most ``2*workers``
    batches in flight (memory stays bounded whatever the corpus)."""
    if workers <= 1:
        for info, batch in batches:
            yield info, encoder(batch)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    initargs = (spec, encoder.eos, encoder.dtype.name)
    with ctx.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for info, batch in batches:
            pending.append((info, pool.apply_async(_encode_in_worker, (batch,))))
            if len(pending) >= 2 * workers:
                info0, result = pending.popleft()
                yield info0, result.get()
        while pending:
            info0, result = pending.popleft()
            yield info0, result.get()


def batched(stream: Iterator[tuple[Doc, bool, int]], size: int) -> Iterator:
    """``(info, [(text, is_val), ...])``; info = per-split (documents, text bytes) and progress."""
    while chunk := list(itertools.islice(stream, size)):
        info = {"docs": len(chunk), "advance": sum(d.advance for d, _, _ in chunk)}
        for s, want_val in zip(SPLITS, (False, True)):
            info[s] = (
                sum(v == want_val for _, v, _ in chunk),
                sum(n for _, v, n in chunk if v == want_val),
            )
        yield info, [(d.text, v) for d, v, _ in chunk]


# -- writing ---------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Appends to ``train.bin``/``val.bin``; ``commit`` makes the bytes so far durable and records
    them in the state file. Opening with a resumed ``Progress`` truncates each shard to its
    committed size (bytes written after the last commit are dropped)."""

    def __init__(self, out: Path, progress: Progress, itemsize: int) -> None:
        self.out, self.itemsize = out, itemsize
        self.files = {}
        for s in SPLITS:
            path = out / f"{s}.bin"
            f = path.open("r+b" if path.exists() else "w+b")
            f.truncate(progress.splits[s].tokens * itemsize)
            f.seek(0, os.SEEK_END)
            self.files[s] = f

    def append(self, split: str, arr: np.ndarray) -> None:
        self.files[split].write(memoryview(arr))  # no copy: the array is contiguous

    def commit(self, progress: Progress) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        _atomic_write(self.out / STATE, json.dumps(progress.to_json()))

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _start(out: Path, key: str) -> tuple[Progress, dict | None]:
    """Resume from a matching state file, or start afresh (a finished matching run: its meta)."""
    out.mkdir(parents=True, exist_ok=True)
    meta_path, state_path = out / "meta.json", out / STATE
    if meta_path.is_file() and not state_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if meta.get("prepare_key") == key:
            return Progress(key), meta
    if state_path.is_file():
        try:
            progress = Progress.from_json(json.loads(state_path.read_text()))
        except (ValueError, KeyError, TypeError):
            progress = None
        if progress is not None and progress.key == key:
            return progress, None
    meta_path.unlink(missing_ok=True)  # whatever is here is not this run's finished output
    progress = Progress(key)
    for s in SPLITS:
        (out / f"{s}.bin").unlink(missing_ok=True)
    return progress, None


def _meta(args, spec, eos, dtype, vocab, progress: Progress, split_rule: str) -> dict:
    c = progress.splits
    itemsize = np.dtype(dtype).itemsize
    return {
        "dtype": dtype,
        "vocab_size": vocab,
        "train_tokens": c["train"].tokens,
        "val_tokens": c["val"].tokens,
        "tokenizer": spec.identity(),
        "eos_id": eos,
        "documents": {s: c[s].documents for s in SPLITS},
        "text_bytes": {s: c[s].text_bytes for s in SPLITS},
        "shards": {
            f"{s}.bin": {"tokens": c[s].tokens, "bytes": c[s].tokens * itemsize} for s in SPLITS
        },
        "split": {"by": split_rule, "val_fraction": args.val_fraction},
        "source": ",".join(map(str, args.inputs)),
        "input_bytes": progress.input_bytes,
        "prepare_key": progress.key,
    }


def prepare(args: PrepareArgs, on_commit: Callable[[Progress], None] | None = None) -> dict:
    """Write the shards for ``args`` (resuming a matching interrupted run); returns meta.json.

    ``on_commit`` is called after every commit (the tests use it to stop a run at a known point).
    """
    if not 0 < args.val_fraction < 1:
        raise DataError(f"--val-fraction {args.val_fraction} must be between 0 and 1")
    spec, tok = load_tokenizer(args.tokenizer)
    eos = choose_eos(tok, args.eos_id, spec.name)
    dtype = choose_dtype(args.dtype, tok.vocab_size, spec.name)
    files = collect_inputs(args.inputs, args.suffixes)
    dirs = [str(p.resolve() if p.is_dir() else p.resolve().parent) for p in args.inputs]
    root = Path(os.path.commonpath(dirs))
    key = run_key(args, spec, eos, dtype, files, root)
    progress, done = _start(args.out, key)
    if done is not None:
        return done
    by_bytes = splits_by_bytes(files, args.val_fraction)
    docs = read_documents(files, root, args.field)
    if by_bytes:
        stream = capped(split_by_bytes(docs, args.val_fraction, len(files) == 1), args.max_bytes)
    else:
        stream = capped(split_by_document(docs, args.val_fraction), args.max_bytes)
    stream = itertools.islice(stream, progress.docs_done, None)  # resume: skip what is written
    batches = encoded(
        batched(stream, args.batch_docs), Encoder(tok, eos, dtype), spec, args.workers
    )
    total = sum(f.stat().st_size for f in files)
    _write(args, batches, progress, np.dtype(dtype).itemsize, total, on_commit)
    for s in SPLITS:
        if progress.splits[s].documents == 0:
            raise DataError(
                f"{progress.docs_done} documents gave no {s} document with --val-fraction "
                f"{args.val_fraction}: add documents or change --val-fraction"
            )
    rule = "bytes" if by_bytes else "document"
    meta = _meta(args, spec, eos, dtype, tok.vocab_size, progress, rule)
    _atomic_write(args.out / "meta.json", json.dumps(meta, indent=2))
    (args.out / STATE).unlink()
    return meta


def _write(args: PrepareArgs, batches, progress: Progress, itemsize: int, total: int, on_commit):
    """Append every encoded batch in order, committing every ``args.commit_batches``."""
    writer = ShardWriter(args.out, progress, itemsize)
    bar = tqdm(
        total=total, initial=progress.input_bytes, unit="B", unit_scale=True, desc="prepare",
        file=sys.stderr, disable=args.quiet,
    )  # fmt: skip
    try:
        for i, (info, arrays) in enumerate(batches, 1):
            for s, arr in zip(SPLITS, arrays):
                writer.append(s, arr)
                c = progress.splits[s]
                c.tokens, c.documents = c.tokens + arr.size, c.documents + info[s][0]
                c.text_bytes += info[s][1]
            progress.docs_done += info["docs"]
            progress.input_bytes += info["advance"]
            bar.update(info["advance"])
            if i % args.commit_batches == 0:
                writer.commit(progress)
                if on_commit is not None:
                    on_commit(progress)
        writer.commit(progress)
    finally:
        bar.close()
        writer.close()


def parse_args(argv: list[str] | None) -> PrepareArgs:
    ap = argparse.ArgumentParser(
        prog="python -m train.prepare", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "inputs", nargs="+", type=Path, help="text/jsonl/jsonl.gz/parquet files or folders"
    )
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument(
        "--tokenizer", default="bytes", help="bytes | path/tokenizer.json | path/x.model"
    )
    ap.add_argument("--field", default="text", help="jsonl field / parquet column holding the text")
    ap.add_argument(
        "--suffix",
        action="append",
        default=None,
        help=f"name suffixes read from folders (default {' '.join(DEFAULT_SUFFIXES)})",
    )
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--max-bytes", type=int, default=0, help="cap on UTF-8 text bytes (0 = all)")
    ap.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    ap.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto")
    ap.add_argument(
        "--eos-id", type=int, default=None, help="end-of-document id (default: the tokenizer's)"
    )
    ap.add_argument("--batch-docs", type=int, default=256, help="documents per tokenizing task")
    ap.add_argument("--commit-batches", type=int, default=16, help="batches between resume points")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    return PrepareArgs(
        out=a.out,
        inputs=a.inputs,
        tokenizer=a.tokenizer,
        field=a.field,
        suffixes=tuple(a.suffix or DEFAULT_SUFFIXES),
        val_fraction=a.val_fraction,
        max_bytes=a.max_bytes,
        workers=a.workers,
        dtype=a.dtype,
        eos_id=a.eos_id,
        batch_docs=a.batch_docs,
        commit_batches=a.commit_batches,
        quiet=a.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        meta = prepare(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    docs = meta["documents"]
    print(
        f"wrote {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val "
        f"{meta['dtype']} tokens from {docs['train']:,} + {docs['val']:,} documents "
        f"({meta['tokenizer']['kind']} tokenizer {meta['tokenizer']['name']}, vocabulary "
        f"{meta['vocab_size']:,}, eos {meta['eos_id']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
