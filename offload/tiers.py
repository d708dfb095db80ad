"""Subgroups and where their optimizer state lives: the accelerator, host memory, NVMe files.

Owns the flat layout (ZeRO-Infinity's sub-groups, Deep Optimizer States' subgroups): parameters
of one param group are packed, in order and whole, into subgroups of about ``subgroup_size``
elements; each subgroup keeps one contiguous fp32 block of shape ``(3, N_pad)`` holding
``[master weights, exp_avg, exp_avg_sq]``, so a tier move is one aligned copy or one file I/O.
``N_pad`` is ``N`` rounded up to 1024 elements (4 KiB), the O_DIRECT alignment.

Placements (per subgroup; ``state lives / update runs``):

=========  =================  ===========
placement  state              update on
=========  =================  ===========
device     accelerator        accelerator
stage      host (pinned)      accelerator (state copied in and back each step)
cpu        host (pinned)      CPU
nvme       NVMe file          CPU (through aligned staging buffers)
=========  =================  ===========

Also the pre-flight check of an NVMe folder (writable, enough free space, space reserved with
``posix_fallocate``) so a full or read-only disk fails before the first step, not in the middle.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.errors import OffloadConfigError
from offload.aio import ALIGN, aligned_empty

PLACEMENTS = ("device", "stage", "cpu", "nvme")
PAD = ALIGN // 4  # fp32 elements per alignment unit


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local data of a parameter or gradient (``to_local()`` of a DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def padded(n: int) -> int:
    """``n`` rounded up to a multiple of ``PAD`` elements (at least one unit)."""
    return max(PAD, -(-n // PAD) * PAD)


@dataclass
class Subgroup:
    """A run of whole parameters (rank-local shards) of one param group, updated together.

    Attributes:
        params: the model parameters (DTensors allowed); their local shards are updated.
        offsets: start of each parameter inside the flat ``(N,)`` view.
        state: ``(3, N_pad)`` fp32 on the device (device), on the host (stage, cpu), or None
            (nvme: it lives in ``file`` and passes through staging buffers).
    """

    index: int
    group: int
    params: list[torch.Tensor]
    offsets: list[int]
    numel: int
    placement: str = "cpu"
    state: torch.Tensor | None = None
    file: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def numel_padded(self) -> int:
        return padded(self.numel)

    @property
    def state_bytes(self) -> int:
        return 3 * self.numel_padded * 4

    def locals(self) -> list[torch.Tensor]:
        return [local_tensor(p) for p in self.params]


def build_subgroups(param_groups: list[dict], subgroup_size: int) -> list[Subgroup]:
    """Pack parameters with ``requires_grad`` into subgroups of about ``subgroup_size`` elements.

    A parameter is never split; one larger than ``subgroup_size`` forms its own subgroup.
    Parameters whose local shard is empty (uneven FSDP sharding) are skipped.
    """
    out: list[Subgroup] = []
    for gi, group in enumerate(param_groups):
        cur: list[torch.Tensor] = []
        offs: list[int] = []
        n = 0
        for p in group["params"]:
            k = local_tensor(p).numel()
            if not p.requires_grad or k == 0:
                continue
            if cur and n + k > subgroup_size:
                out.append(Subgroup(len(out), gi, cur, offs, n))
                cur, offs, n = [], [], 0
            cur.append(p)
            offs.append(n)
            n += k
        if cur:
            out.append(Subgroup(len(out), gi, cur, offs, n))
    return out


def aliasable(sg: Subgroup, device: torch.device) -> bool:
    """Whether a subgroup's parameters can become views of its master-weight row (DeepSpeed's
    flat-buffer trick): a ``cpu`` subgroup of a CPU-resident model whose parameters are plain
    fp32 tensors not yet owned by another optimizer's subgroup. DTensor (FSDP2) parameters keep
    their storage (FSDP owns it)."""
    return (
        device.type == "cpu"
        and sg.placement == "cpu"
        and not any(
            hasattr(p, "to_local") or p.dtype != torch.float32 or hasattr(p, "_offload_row")
            for p in sg.params
        )
    )


def gather_flat(tensors: list[torch.Tensor], sg: Subgroup, out: torch.Tensor) -> torch.Tensor:
    """Copy ``tensors`` (one per parameter, local shapes) into ``out[:N]`` (any device pair)."""
    for t, off in zip(tensors, sg.offsets):
        out[off : off + t.numel()].copy_(t.reshape(-1), non_blocking=True)
    return out[: sg.numel]


def scatter_flat(flat: torch.Tensor, sg: Subgroup, targets: list[torch.Tensor]) -> None:
    """Copy ``flat[:N]`` back into ``targets`` (one per parameter, local shapes)."""
    for t, off in zip(targets, sg.offsets):
        t.copy_(flat[off : off + t.numel()].view_as(t), non_blocking=True)


def allocate_state(sg: Subgroup, device: torch.device) -> torch.Tensor:
    """Zeroed ``(3, N_pad)`` block: on ``device`` (device placement) or aligned host memory."""
    if sg.placement == "device":
        return torch.zeros(3, sg.numel_padded, device=device)
    return aligned_empty(3 * sg.numel_padded).zero_().view(3, sg.numel_padded)


def check_nvme_folder(folder: str | Path, required_bytes: int, field_name: str) -> Path:
    """Create ``folder``, prove it is writable, check and reserve free space.

    Raises:
        OffloadConfigError: the folder cannot be created or written, or has less free space than
            ``required_bytes`` (plus 1% slack); the message names ``field_name`` and the fix.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * ALIGN)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise OffloadConfigError(
            f"{field_name}={str(folder)!r} is not writable ({exc.strerror or exc}): point it at "
            "a writable folder on a local NVMe/SSD"
        ) from exc
    free = shutil.disk_usage(path).free
    if free < required_bytes * 1.01:
        raise OffloadConfigError(
            f"{field_name}={str(folder)!r} has {free / 2**20:.1f} MiB free but the offloaded "
            f"optimizer state needs {required_bytes / 2**20:.1f} MiB: free space, use a larger "
            "disk, or raise offload.host_budget_mb so less state goes to NVMe"
        )
    return path


def reserve_file(path: Path, nbytes: int, field_name: str) -> None:
    """Create ``path`` with ``nbytes`` allocated up front, so ENOSPC cannot happen mid-run."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:  # pragma: no cover - non-Linux
                os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OffloadConfigError(
            f"{field_name}: cannot reserve {nbytes / 2**20:.1f} MiB in {str(path)!r} "
            f"({exc.strerror or exc}): free space on that disk or choose another path"
        ) from exc
