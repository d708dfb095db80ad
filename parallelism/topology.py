"""Host topology: ranks as ``hosts x local ranks`` and the two kinds of groups DMT talks over.

Under torchrun/SLURM rank ``r`` runs on host ``r // L`` as local rank ``r % L``, where ``L`` is
``LOCAL_WORLD_SIZE``. DMT (Luo et al., MLSys 2024) uses

* intra-host groups: the ``L`` ranks of one host (fast link: NVLink / shared memory), and
* cross-host peer groups: the ``H`` ranks with the same local rank, one per host (the slow
  network link; on a rail-optimised cluster these are exactly the ranks wired to the same rail).

Torch's DeviceMesh could express the same as a 2-D ``(host, local)`` mesh; we keep a small
dataclass because the byte counting and the simulated link in ``parallelism/dmt.py`` need the
rank lists, and because a mesh would be created on every call site while these groups are
created once. The validation runs before any process group exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from parallelism.dims import LayoutError


@dataclass(frozen=True)
class Topology:
    """``hosts x local_world_size`` ranks, host-major (rank = host * L + local)."""

    world_size: int
    local_world_size: int

    def __post_init__(self) -> None:
        if self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise LayoutError(
                f"world size {self.world_size} is not a multiple of LOCAL_WORLD_SIZE="
                f"{self.local_world_size}: every host must run the same number of ranks"
            )

    @classmethod
    def from_env(cls, world_size: int | None = None) -> Topology:
        """From WORLD_SIZE and LOCAL_WORLD_SIZE (torchrun sets both; default: one host)."""
        w = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        return cls(w, int(os.environ.get("LOCAL_WORLD_SIZE", str(w))))

    @property
    def hosts(self) -> int:
        return self.world_size // self.local_world_size

    def host(self, rank: int) -> int:
        return rank // self.local_world_size

    def local(self, rank: int) -> int:
        return rank % self.local_world_size

    def intra_host_ranks(self, host: int) -> list[int]:
        """The ranks of ``host``, by local rank."""
        return list(range(host * self.local_world_size, (host + 1) * self.local_world_size))

    def cross_host_ranks(self, local: int) -> list[int]:
        """The peers with local rank ``local``, one per host, by host."""
        return [h * self.local_world_size + local for h in range(self.hosts)]


@dataclass
class HostGroups:
    """This rank's process groups and their rank lists (group rank i = ranks[i])."""

    world: dist.ProcessGroup
    world_ranks: list[int]
    intra: dist.ProcessGroup
    intra_ranks: list[int]
    cross: dist.ProcessGroup
    cross_ranks: list[int]


def build_host_groups(topo: Topology, rank: int) -> HostGroups:
    """Create the intra-host and cross-host groups (collective: every rank must call it)."""
    intra = cross = None
    for h in range(topo.hosts):
        g = dist.new_group(topo.intra_host_ranks(h))
        if topo.host(rank) == h:
            intra = g
    for lr in range(topo.local_world_size):
        g = dist.new_group(topo.cross_host_ranks(lr))
        if topo.local(rank) == lr:
            cross = g
    return HostGroups(
        dist.group.WORLD,
        list(range(topo.world_size)),
        intra,
        topo.intra_host_ranks(topo.host(rank)),
        cross,
        topo.cross_host_ranks(topo.local(rank)),
    )
