"""Single-process consolidation of a universal checkpoint: verify, then assemble logical tensors.

Used by ``python -m checkpoint.export`` and by tests; reads only the chunks (no process group).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from checkpoint.format import (
    CheckpointError,
    TensorMeta,
    box_slices,
    dtype_from_name,
    read_index,
    verify_files,
)


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
    ckpt: Path | str, prefix: str | None = None, verify: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """``load_consolidated`` one tensor at a time, so a caller that writes each tensor out holds
    about one tensor in memory. The files' sizes and sha256 are verified first unless
    ``verify=False`` (the hashing reads the whole checkpoint once more)."""
    ckpt = Path(ckpt)
    index = read_index(ckpt)
    metas = [
        TensorMeta.from_json(n, d)
        for n, d in index["tensors"].items()
        if prefix is None or n.startswith(prefix)
    ]
    if verify:
        verify_files(ckpt, index, {c.file for m in metas for c in m.chunks})
    files: dict[str, int] = {}
    try:
        for m in metas:
            yield m.name, _assemble(ckpt, m, files)
    finally:
        for fd in files.values():
            os.close(fd)


def _assemble(ckpt: Path, m: TensorMeta, files: dict[str, int]) -> torch.Tensor:
    """One logical tensor from its chunks (a single whole chunk is read straight into it)."""
    dtype = dtype_from_name(m.dtype)
    whole = len(m.chunks) == 1 and list(m.chunks[0].shape) == list(m.logical_shape)
    full = (torch.empty if whole else torch.zeros)(m.logical_shape, dtype=dtype)
    for c in m.chunks:
        fd = files.get(c.file)
        if fd is None:
            fd = files[c.file] = os.open(ckpt / c.file, os.O_RDONLY)
        if whole:
            _pread_into(fd, c.byte_offset, full, ckpt / c.file)
            continue
        src = torch.empty(c.shape, dtype=dtype)
        _pread_into(fd, c.byte_offset, src, ckpt / c.file)
        full[box_slices(c.offset, c.shape, [0] * len(c.shape))] = src
    return full


def _pread_into(fd: int, offset: int, out: torch.Tensor, path: Path) -> None:
    """Fill the contiguous ``out`` with its bytes at ``offset``. Read, not memory-mapped: a map
    kept open across tensors would leave every page read so far in the resident set, so an
    export would peak at the whole model instead of one tensor plus one output shard."""
    nbytes = out.numel() * out.element_size()
    if nbytes == 0:
        return
    view, done = memoryview(out.view(-1).view(torch.uint8).numpy()), 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path} ends at byte {offset + done}: truncated checkpoint")
        done += n
