"""ParallelDims: the degrees of every parallel dimension and the one DeviceMesh built from them.

Follows torchtitan's ``ParallelDims``: a small dataclass validated against the world size (and
the host size) before any process group exists, whose errors name the offending field. The mesh
order is ``pp, dp_replicate, dp_shard, sp, tp`` with tp innermost, so consecutive ranks (one
host under torchrun/SLURM) form the tensor-parallel groups, and pp outermost, so pipeline
neighbours may sit on different hosts where only point-to-point traffic crosses the slow link.
Expert parallelism borrows ranks from ``dp_replicate x dp_shard x sp``, innermost first (as
megatron-core's ``tp-cp-ep-dp-pp`` order: an ep group is ep consecutive data/sequence ranks, so
it borrows from ``dp_replicate`` only once it has spanned ``dp_shard x sp``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from models.errors import LayoutError

MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "sp", "tp")


@dataclass
class ParallelDims:
    """Parallel degrees. ``-1`` for dp_replicate or dp_shard means "whatever is left"."""

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    sp: int = 1
    ep: int = 1
    local_world_size: int = 0
    allow_cross_host_tp: bool = False
    _mesh: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._resolve_and_validate()

    # -- validation -------------------------------------------------------------------------
    def _resolve_and_validate(self) -> None:
        for name in ("tp", "pp", "sp", "ep"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise LayoutError(
                "parallel.dp_replicate and parallel.dp_shard are both -1: set one of them"
            )
        fixed = self.tp * self.pp * self.sp
        if self.world_size % fixed:
            raise LayoutError(
                f"world size {self.world_size} is not divisible by tp*pp*sp = "
                f"{self.tp}*{self.pp}*{self.sp} = {fixed}: change parallel.tp/pp/sp or the "
                "number of processes"
            )
        left = self.world_size // fixed
        for name, other in (("dp_shard", "dp_replicate"), ("dp_replicate", "dp_shard")):
            if getattr(self, name) == -1:
                o = getattr(self, other)
                if o < 1 or left % o:
                    raise LayoutError(
                        f"parallel.{other}={o} does not divide world_size/(tp*pp*sp) = {left}"
                    )
                setattr(self, name, left // o)
        for name in ("dp_replicate", "dp_shard"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name}={getattr(self, name)} must be >= 1 or -1")
        product = self.pp * self.dp_replicate * self.dp_shard * self.sp * self.tp
        if product != self.world_size:
            terms = " x ".join(f"parallel.{n}={getattr(self, n)}" for n in MESH_ORDER)
            raise LayoutError(
                f"{terms} = {product} != world size {self.world_size}: change the degrees "
                "(or set one of dp_shard/dp_replicate to -1) or the number of processes"
            )
        edp_ranks = self.dp_replicate * self.dp_shard * self.sp
        if self.ep > 1 and edp_ranks % self.ep:
            raise LayoutError(
                f"parallel.ep={self.ep} must divide dp_replicate*dp_shard*sp = {edp_ranks} "
                "(expert parallelism borrows data/sequence-parallel ranks)"
            )
        lws = self.local_world_size or self.world_size
        if self.tp > 1 and lws % self.tp and not self.allow_cross_host_tp:
            raise LayoutError(
                f"parallel.tp={self.tp} does not divide the ranks per host ({lws}, from "
                "LOCAL_WORLD_SIZE): a tensor-parallel group would span hosts. Lower parallel.tp "
                "or set parallel.allow_cross_host_tp=true"
            )

    # -- derived sizes ------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.sp > 1

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, n) for n in MESH_ORDER)

    # -- mesh ---------------------------------------------------------------------------------
    def build_mesh(self, device_type: str = "cpu") -> Any:
        """Create the DeviceMesh (the default process group must exist) with flattened views:
        ``dp`` (dp_replicate x dp_shard: data loading), ``dp_shard_sp`` (FSDP sharding) and
        ``dp_sp`` (loss/metric reduction)."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=MESH_ORDER)
        # Keep the flattened meshes ourselves (slicing them from the root is deprecated).
        self._flat = {
            "dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
            "dp_shard_sp": mesh["dp_shard", "sp"]._flatten("dp_shard_sp"),
            "dp_sp": mesh["dp_replicate", "dp_shard", "sp"]._flatten("dp_sp"),
        }
        self._mesh = mesh
        return mesh

    def submesh(self, name: str) -> Any:
        """A 1-D mesh by name: a mesh dimension or one of the flattened ``dp``, ``dp_shard_sp``,
        ``dp_sp``."""
        flat = getattr(self, "_flat", {})
        return flat[name] if name in flat else self.mesh[name]

    @property
    def mesh(self) -> Any:
        if self._mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self._mesh

    def coordinate(self, rank: int) -> dict[str, int]:
        """Mesh coordinate of a global rank (pure arithmetic; no process group needed)."""
        coord = {}
        for name in reversed(MESH_ORDER):
            size = getattr(self, name)
            coord[name] = rank % size
            rank //= size
        return coord


def dims_from_config(parallel: Any, world_size: int | None = None) -> ParallelDims:
    """Build ParallelDims from ``cfg.parallel`` and the torchrun environment."""
    ws = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    return ParallelDims(
        world_size=ws,
        dp_replicate=parallel.dp_replicate,
        dp_shard=parallel.dp_shard,
        tp=parallel.tp,
        pp=parallel.pp,
        sp=parallel.sp,
        ep=parallel.ep,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "0")),
        allow_cross_host_tp=parallel.allow_cross_host_tp,
    )
