"""The universal checkpoint format: index schema, chunk geometry, integrity and atomic commit.

Layout of one checkpoint (Universal Checkpointing's "save distributed, load consolidated")::

    <run>/checkpoints/step_00000008/
        shards/rank_00000.bin        raw little-endian tensor bytes, 64-byte aligned, no pickle
        train_state/rank_00000.json  per-rank RNG state (base64 of the generator bytes)
        train_state.json             step, LR scheduler, data position (global samples), config
        index.json                   written LAST (temp + fsync + rename): the commit marker
    <run>/checkpoints/latest         text file naming the newest committed step dir (atomic rename)

``index.json`` holds, for every tensor, its logical name (``model/<canonical fqn>`` or
``optim/<canonical fqn>/<state key>``), logical global shape (vocabulary padding removed),
dtype, partitioning (DTensor placements on named mesh dims; padding, expert and fused-sub-
parameter fields) and its chunks (file, byte offset, global offset, shape); and the manifest:
sha256 and size of every file. The manifest lives inside the index, so the commit marker and the
checksums are written by one atomic rename.

Written here rather than with DCP's ``FileSystemWriter`` because its ``.metadata`` is a pickle,
it records no logical shape, padding or integrity hash, it has no ``latest``/retention protocol,
and its ``async_save`` stages (copies) synchronously at call time, which the lazy engine must not.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from models.errors import CheckpointError

FORMAT = "lattice-universal-checkpoint"
VERSION = 1
ALIGN = 64
INDEX = "index.json"
LATEST = "latest"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint index")
    return dt


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Chunk:
    """One rectangular piece of a tensor stored in one file.

    ``offset``/``shape`` are in logical global coordinates; ``byte_offset`` is where its
    C-contiguous bytes start in ``file``.
    """

    file: str
    byte_offset: int
    nbytes: int
    offset: list[int]
    shape: list[int]

    def to_json(self) -> dict:
        return self.__dict__.copy()


@dataclass
class TensorMeta:
    """Everything needed to rebuild one logical tensor on any layout.

    ``partitioning`` fields: ``placements`` (e.g. ``["Shard(0)", "Replicate()"]``) on
    ``mesh_dims`` (names, e.g. ``["dp_replicate", "dp_shard"]``) as saved; ``padding``
    ``{"dim": d, "padded_size": n}`` when the saved tensor had rows beyond the logical shape
    (vocabulary padding; they are dropped on save and zero-filled on load); ``expert``
    ``{"dim": d, "num_experts": E}`` when dimension ``d`` indexes experts (chunks then carry global
    expert indices in ``offset[d]``, so expert-parallel resharding is the same overlap read);
    ``fused`` ``[{"name": "wq", "dim": 0, "size": n}, ...]`` when the tensor is a concatenation
    of sub-parameters (QKV, gate/up) whose split must survive a change of tensor parallelism.
    """

    name: str
    logical_shape: list[int]
    dtype: str
    partitioning: dict[str, Any] = field(default_factory=dict)
    chunks: list[Chunk] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "logical_shape": self.logical_shape,
            "dtype": self.dtype,
            "partitioning": self.partitioning,
            "chunks": [c.to_json() for c in self.chunks],
        }

    @classmethod
    def from_json(cls, name: str, d: dict) -> TensorMeta:
        return cls(
            name,
            list(d["logical_shape"]),
            d["dtype"],
            dict(d.get("partitioning", {})),
            [Chunk(**c) for c in d["chunks"]],
        )


def overlap(
    a_off: Iterable[int], a_shape: Iterable[int], b_off: Iterable[int], b_shape: Iterable[int]
) -> tuple[list[int], list[int]] | None:
    """Intersection of two boxes in global coordinates: (offset, shape), or None if empty."""
    off, shape = [], []
    for ao, asz, bo, bsz in zip(a_off, a_shape, b_off, b_shape):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        off.append(lo)
        shape.append(hi - lo)
    return off, shape


def box_slices(off: list[int], shape: list[int], base: list[int]) -> tuple[slice, ...]:
    """Slices selecting the box (``off``, ``shape``) inside a tensor whose origin is ``base``."""
    return tuple(slice(o - b, o - b + s) for o, s, b in zip(off, shape, base))


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def encode_tensor(t: torch.Tensor) -> dict:
    """A small tensor (RNG state) as JSON: dtype, shape and base64 bytes (no pickle)."""
    t = t.detach().cpu().contiguous()
    return {
        "dtype": dtype_name(t.dtype),
        "shape": list(t.shape),
        "b64": base64.b64encode(t.reshape(-1).view(torch.uint8).numpy().tobytes()).decode(),
    }


def decode_tensor(d: dict) -> torch.Tensor:
    raw = bytearray(base64.b64decode(d["b64"]))
    t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return t.view(dtype_from_name(d["dtype"])).reshape(d["shape"]).clone()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def read_index(ckpt: Path) -> dict:
    """The parsed index of a committed checkpoint; refuses uncommitted or foreign folders."""
    path = Path(ckpt) / INDEX
    if not path.exists():
        raise CheckpointError(
            f"{ckpt} has no {INDEX}: the checkpoint was never committed (crash during save?); "
            f"resume from an earlier step or checkpoint.resume=latest"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} index")
    if index.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has format version {index['version']} > {VERSION}")
    return index


class Damage(NamedTuple):
    """One file failing its manifest check: ``kind`` is ``unlisted``, ``missing``, ``size``,
    ``sha256`` or ``unreadable``; ``message`` names the file and what is wrong."""

    rel: str
    kind: str
    message: str


def file_damage(ckpt: Path, index: dict, rel: str) -> Damage | None:
    """Check one file's presence, size and sha256 against the manifest; None when it matches."""
    path = Path(ckpt) / rel
    entry = index["manifest"].get(rel)
    if entry is None:
        return Damage(rel, "unlisted", f"{path} is not listed in the manifest of {ckpt}/{INDEX}")
    if not path.exists():
        return Damage(rel, "missing", f"{path} is missing (listed in {ckpt}/{INDEX})")
    size = path.stat().st_size
    if size != entry["bytes"]:
        return Damage(
            rel,
            "size",
            f"{path} is truncated or padded: {size} bytes, manifest says {entry['bytes']}",
        )
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        return Damage(
            rel,
            "sha256",
            f"{path} is corrupt: sha256 {digest[:16]}... != manifest {entry['sha256'][:16]}...",
        )
    return None


def verify_files(ckpt: Path, index: dict, files: Iterable[str]) -> None:
    """Check size and sha256 of ``files`` against the manifest; raise naming the first bad one."""
    for rel in sorted(set(files)):
        damage = file_damage(ckpt, index, rel)
        if damage is None:
            continue
        refuse = "; refusing to load this checkpoint" if damage.kind in ("size", "sha256") else ""
        raise CheckpointError(damage.message + refuse)


def referenced_files(ckpt: Path, index: dict) -> set[str]:
    """Every file a checkpoint consists of: its manifest, its train state and its chunks' files."""
    try:
        chunks = {c["file"] for t in index["tensors"].values() for c in t["chunks"]}
        return set(index["manifest"]) | {index["train_state"]} | chunks
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{ckpt}/{INDEX} is malformed (missing or bad field {e})") from e


def _readable_damage(ckpt: Path, index: dict, rel: str) -> Damage | None:
    """``file_damage``, reporting a file that cannot be read as damage rather than raising."""
    try:
        return file_damage(ckpt, index, rel)
    except OSError as e:
        return Damage(rel, "unreadable", f"{Path(ckpt) / rel} cannot be read ({e.strerror})")


def checkpoint_damage(ckpt: Path, index: dict) -> list[Damage]:
    """Every damaged file of ``ckpt`` (not only the first), sorted by path."""
    found = (_readable_damage(ckpt, index, rel) for rel in sorted(referenced_files(ckpt, index)))
    return [d for d in found if d is not None]


FRESH = ("", "none")
"""``checkpoint.resume`` values that mean a fresh start."""


def names_checkpoint(spec: str) -> bool:
    """Whether ``checkpoint.resume=spec`` names a checkpoint that must exist (not a fresh
    start, not ``auto``, which resumes only when checkpointing is on and one exists)."""
    return spec not in (*FRESH, "auto")


def committed_steps(root: Path) -> list[Path]:
    """The committed ``step_*`` folders of ``root`` (their index.json exists), oldest first."""
    return sorted(p for p in Path(root).glob("step_*") if (p / INDEX).exists())


def _latest_of(root: Path) -> Path:
    """The step ``root/latest`` names, which must be committed; without a ``latest`` file, the
    newest committed step (the one ``latest`` would name)."""
    committed = committed_steps(root)
    latest = root / LATEST
    if latest.exists():
        name = latest.read_text(errors="replace").strip()
        target = root / name
        if name.startswith("step_") and "/" not in name and (target / INDEX).exists():
            return target
        newest = (
            f"the newest committed checkpoint is {committed[-1]}: resume from it with "
            f"checkpoint.resume={committed[-1]}"
            if committed
            else f"{root} holds no committed checkpoint"
        )
        raise CheckpointError(
            f"{latest} names {name[:80]!r}, which is not a committed checkpoint of {root} "
            f"(the file is damaged or the step was deleted); {newest}"
        )
    if not committed:
        raise CheckpointError(
            f"{root} holds no committed checkpoint; use checkpoint.resume=auto to resume when "
            f"there is one and start fresh otherwise"
        )
    return committed[-1]


def newest_clean_before(ckpt: Path) -> Path | None:
    """The newest committed step of ``ckpt``'s checkpoints folder older than ``ckpt`` whose
    every file verifies, or None."""
    ckpt = Path(ckpt)
    for older in reversed(committed_steps(ckpt.parent)):
        if older.name >= ckpt.name:
            continue
        try:
            if not checkpoint_damage(older, read_index(older)):
                return older
        except (CheckpointError, OSError):
            continue
    return None


def has_checkpoints(root: Path) -> bool:
    """Whether ``root`` holds a ``latest`` file or any committed step."""
    return (Path(root) / LATEST).exists() or bool(committed_steps(root))


def resolve(root: Path, spec: str) -> Path:
    """The checkpoint folder ``checkpoint.resume=spec`` means.

    ``spec`` is ``latest`` (the step ``root/latest`` names) or a path: a step folder, a
    checkpoints folder (its ``latest``), or a ``latest`` file itself."""
    if spec == LATEST:
        return _latest_of(Path(root))
    p = Path(spec)
    if not p.exists():
        raise CheckpointError(f"checkpoint.resume={spec!r}: no such checkpoint folder or file")
    if p.is_file():
        if p.name == LATEST:
            return _latest_of(p.parent)
        raise CheckpointError(
            f"checkpoint.resume={spec!r} is a file: give a step folder (step_*), a checkpoints "
            f"folder, or its {LATEST} file"
        )
    if (p / INDEX).exists() or p.name.startswith("step_"):
        return p  # an uncommitted step folder is refused by read_index, naming why
    if has_checkpoints(p):
        return _latest_of(p)
    raise CheckpointError(
        f"checkpoint.resume={spec!r} holds no checkpoint (no {INDEX}, {LATEST} or step_* "
        f"folders): give a step folder, a checkpoints folder, or its {LATEST} file"
    )
