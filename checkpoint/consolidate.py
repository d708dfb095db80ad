"""Single-process consolidation of a universal checkpoint: verify, then assemble logical tensors.

Used by ``python -m checkpoint.export`` and by tests; reads only the chunks (no process group).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
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
    mmaps: dict[str, np.memmap] = {}
    for m in metas:
        full = torch.zeros(m.logical_shape, dtype=dtype_from_name(m.dtype))
        for c in m.chunks:
            mm = mmaps.get(c.file)
            if mm is None:
                mm = mmaps[c.file] = np.memmap(ckpt / c.file, dtype=np.uint8, mode="r")
            raw = torch.from_numpy(np.array(mm[c.byte_offset : c.byte_offset + c.nbytes]))
            src = raw.view(full.dtype).reshape(c.shape)
            full[box_slices(c.offset, c.shape, [0] * len(c.shape))] = src
        yield m.name, full
