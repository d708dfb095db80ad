"""Read a box of one safetensors tensor: only the bytes of the rows and columns asked for.

safetensors' own ``safe_open(path, "pt").get_slice(key)`` does the byte-range work: it parses
the header (each tensor's dtype, shape and ``data_offsets``), maps the file and, for
``slice[r0:r1, c0:c1]``, copies just those rows' column range out of the map (a row range of a
row-major tensor is one contiguous byte range, a column range one range per row). What it does
not do, and is hand-written here, is an arbitrary *set* of indices: a rank's shard under
``_StridedShard`` (FSDP over tensor parallelism), or the rows of a RoPE-permuted ``q_proj``
that Lattice's interleaved order asks for. Those index sets are sorted, cut into contiguous runs,
each run read with one ``get_slice`` call, and the result put back in the asked order. The file
is opened per call and closed after, so the mapped pages a read touched leave the process's
resident set with it: peak memory is the box plus what one call maps.
"""

from __future__ import annotations

from pathlib import Path

import torch


def runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` runs covering the sorted unique values of ``index``."""
    values = torch.unique(index).tolist()  # sorted
    out: list[tuple[int, int]] = []
    for v in values:
        if out and out[-1][1] == v:
            out[-1] = (out[-1][0], v + 1)
        else:
            out.append((v, v + 1))
    return out


def tensor_shape(path: Path | str, key: str) -> tuple[int, ...]:
    """``key``'s shape from the file's header (no data read)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return tuple(f.get_slice(key).get_shape())


def read_box(path: Path | str, key: str, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``tensor[index[0]][:, index[1]]...`` of ``key`` in ``path``, reading only those bytes.

    Args:
        path: a ``.safetensors`` file.
        key: the tensor's name in it.
        index: one 1-D int tensor of indices per leading dimension (any order, repeats allowed);
            trailing dimensions not given are read whole. At most two dimensions are indexed.

    Returns:
        The box, shape ``(len(index[0]), len(index[1]), *rest)``, in the file's dtype.
    """
    from safetensors import safe_open

    if not 1 <= len(index) <= 2:
        raise ValueError(f"read_box indexes 1 or 2 dimensions, not {len(index)}")
    rows = index[0].long()
    cols = index[1].long() if len(index) == 2 else None
    with safe_open(str(path), "pt") as f:
        sl = f.get_slice(key)
        if rows.numel() == 0 or (cols is not None and cols.numel() == 0):
            return _empty(sl, rows, cols)
        col_runs = runs(cols) if cols is not None else [(None, None)]
        blocks = []
        for r0, r1 in runs(rows):
            parts = [sl[r0:r1] if c0 is None else sl[r0:r1, c0:c1] for c0, c1 in col_runs]
            blocks.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    box = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    box = _reorder(box, rows, 0)
    return box if cols is None else _reorder(box, cols, 1)


def _reorder(box: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """The read (sorted, unique) positions of ``dim`` back in ``index``'s order; no copy when
    ``index`` was sorted and unique already (the usual shard)."""
    unique = torch.unique(index)
    if unique.numel() == index.numel() and torch.equal(unique, index):
        return box
    return box.index_select(dim, torch.searchsorted(unique, index))


def _empty(sl, rows: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    shape = list(sl.get_shape())
    dtype = sl[0:0].dtype
    shape[0] = rows.numel()
    if cols is not None:
        shape[1] = cols.numel()
    return torch.empty(shape, dtype=dtype)
