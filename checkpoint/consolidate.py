"""Single-process consolidation of a universal checkpoint: verify, then assemble logical tensors.

Used by ``python -m checkpoint.export`` and by tests; reads only the chunks (no process group).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from checkpoint.format import TensorMeta, box_slices, dtype_from_name, read_index, verify_files


def load_consolidated(ckpt: Path | str, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``ckpt`` at its logical shape: ``{"model/<fqn>": tensor, ...}``.

    Args:
        ckpt: a committed checkpoint folder (``.../step_00000008``).
        prefix: keep only names starting with it (e.g. ``"model/"``).

    Raises:
        CheckpointError: uncommitted checkpoint, or a file failing its size/sha256 check.
    """
    return dict(iter_consolidated(ckpt, prefix))


def iter_consolidated(
    ckpt: Path | str, prefix: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``load_consolidated`` one tensor at a time (the files are verified first), so a caller
    that writes each tensor out holds about one tensor in memory."""
    ckpt = Path(ckpt)
    index = read_index(ckpt)
    metas = [
        TensorMeta.from_json(n, d)
        for n, d in index["tensors"].items()
        if prefix is None or n.startswith(prefix)
    ]
    verify_files(ckpt, index, {c.file for m in metas for c in m.chunks})
    files: dict[str, int] = {}
    try:
        for m in metas:
            full = torch.zeros(m.logical_shape, dtype=dtype_from_name(m.dtype))
            for c in m.chunks:
                fd = files.get(c.file)
                if fd is None:
                    fd = files[c.file] = os.open(ckpt / c.file, os.O_RDONLY)
                src = _pread(fd, c.byte_offset, c.nbytes).view(full.dtype).reshape(c.shape)
                full[box_slices(c.offset, c.shape, [0] * len(c.shape))] = src
            yield m.name, full
    finally:
        for fd in files.values():
            os.close(fd)


def _pread(fd: int, offset: int, nbytes: int) -> torch.Tensor:
    """``nbytes`` at ``offset`` as a uint8 tensor. Read, not memory-mapped: a map kept open
    across tensors would leave every page read so far in the resident set, so exporting a
    model would peak at its whole size instead of one tensor plus one output shard."""
    buf = bytearray(nbytes)
    view, done = memoryview(buf), 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"chunk at byte {offset + done} past the end of its file")
        done += n
    return torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
