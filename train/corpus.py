"""Documents from text files, JSON lines (plain or gzipped) and parquet, read lazily.

A text file is one document; a ``.jsonl``/``.jsonl.gz`` line is one document (its ``field``,
default ``text``; blank lines are skipped); a parquet row is one document (its ``field`` column,
read one row group at a time with pyarrow). Memory is bounded by the largest text file, jsonl
line or parquet row group, never by the corpus.

Every document is checked here, where its file (and line) is known: text must be UTF-8 and hold no
NUL character (a NUL is the sign of a binary file, and id 0 is the bytes tokenizer's EOS). Each
failure is a one-line ``DataError`` naming the file, the line and the fix.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from models.errors import DataError

DEFAULT_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".jsonl.gz", ".parquet")


@dataclass
class Doc:
    """One document: its text, where it came from, and input bytes consumed since the last one."""

    text: str
    where: str  # "path", "path:line" or "path:row"
    key: str  # stable identity within the corpus (relative path + index), hashed for the split
    advance: int  # on-disk bytes of input consumed by this document (progress)


def kind_of(path: Path) -> str:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def collect_inputs(inputs: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files named or found under folders (recursively, by name suffix), sorted; never empty."""
    files: set[Path] = set()
    for p in inputs:
        if p.is_dir():
            files |= {f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes)}
        elif p.is_file():
            files.add(p)
        else:
            raise DataError(f"input path {p} does not exist: pass existing files or folders")
    if not files:
        names = " ".join(map(str, inputs))
        raise DataError(
            f"no input files in {names} (suffixes {' '.join(suffixes)}): add files or pass "
            "--suffix for the ones the folder holds"
        )
    return sorted(f.resolve() for f in files)


def check_text(text: str, where: str) -> str:
    nul = text.find("\x00")
    if nul >= 0:
        raise DataError(
            f"{where}: NUL character at offset {nul}: the input looks binary; remove it from the "
            "inputs (or filter folders with --suffix)"
        )
    return text


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text of a text file, or a DataError naming the first bad byte."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"{where}: NUL byte at offset {nul}: it looks like a binary file, not text; remove it "
            "from the inputs (or filter folders with --suffix)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: invalid UTF-8 at byte {e.start}: it is binary or not UTF-8 text; remove it "
            "or convert it to UTF-8"
        ) from None


def read_text(path: Path, rel: str) -> Iterator[Doc]:
    data = path.read_bytes()
    yield Doc(decode_text(data, str(path)), str(path), f"{rel}#0", len(data))


def read_jsonl(path: Path, rel: str, field: str) -> Iterator[Doc]:
    rel = rel.removesuffix(".gz")  # compressing a file does not move its documents across splits
    raw = path.open("rb")
    stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
    pos, index = 0, 0
    with raw, stream:
        for lineno, line in enumerate(stream, 1):
            where = f"{path}:{lineno}"
            advance, pos = raw.tell() - pos, raw.tell()
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(
                    f"{where}: not a JSON object ({e}): each line of a .jsonl file must be one "
                    "JSON object; fix or remove the line"
                ) from None
            if not isinstance(obj, dict) or field not in obj:
                raise DataError(
                    f"{where}: no field {field!r} in this line: pass --field NAME for the field "
                    "that holds the text"
                )
            text = obj[field]
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: field {field!r} is {type(text).__name__}, not a string: pass "
                    "--field NAME for the field that holds the text"
                )
            yield Doc(check_text(text, where), where, f"{rel}#{index}", advance)
            index += 1


def read_parquet(path: Path, rel: str, field: str) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid for non-parquet files
        raise DataError(f"{path}: not a parquet file ({e}): remove it from the inputs") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(
            f"{path}: no column {field!r} (columns: {', '.join(names)}): pass --field NAME for "
            "the column that holds the text"
        )
    size, groups, index = path.stat().st_size, pf.num_row_groups, 0
    for g in range(groups):
        column = pf.read_row_group(g, columns=[field]).column(field).to_pylist()
        share = size // groups + (size % groups if g == groups - 1 else 0)
        for i, text in enumerate(column):
            where = f"{path}: row {index}"
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: column {field!r} holds {type(text).__name__}, not a string: pass "
                    "--field NAME for the column that holds the text"
                )
            yield Doc(check_text(text, where), where, f"{rel}#{index}", share if i == 0 else 0)
            index += 1


def read_documents(files: list[Path], root: Path, field: str) -> Iterator[Doc]:
    """Every document of ``files`` in order; keys use paths relative to ``root``."""
    for f in files:
        rel = f.relative_to(root).as_posix()
        kind = kind_of(f)
        if kind == "jsonl":
            yield from read_jsonl(f, rel, field)
        elif kind == "parquet":
            yield from read_parquet(f, rel, field)
        else:
            yield from read_text(f, rel)
