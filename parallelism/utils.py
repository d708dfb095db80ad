"""Small distributed helpers shared by the trainer and the parallel layouts."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Global L2 norm of all gradients (DTensor shards and pipeline stages included), then
    scale them in place so the norm is at most ``max_norm`` (no clipping when <= 0).

    The norm is computed over every shard and stage before any gradient is touched, so the
    decision is identical on all ranks.

    Returns:
        The total norm before clipping, a 0-d fp32 tensor.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        # DTensors on different meshes (e.g. FSDP and expert-parallel) cannot be stacked
        # together: reduce each mesh's norms separately, then combine the plain totals.
        by_mesh: dict[object, list[torch.Tensor]] = {}
        for g in grads:
            key = g.device_mesh if isinstance(g, DTensor) else None
            by_mesh.setdefault(key, []).append(torch.linalg.vector_norm(g, dtype=torch.float32))
        totals = []
        for norms in by_mesh.values():
            t = torch.linalg.vector_norm(torch.stack(norms))
            totals.append(t.full_tensor() if isinstance(t, DTensor) else t)
        total = torch.linalg.vector_norm(torch.stack(totals))
    else:
        total = torch.zeros(())
    if pp_group is not None:
        sq = total**2
        dist.all_reduce(sq, group=pp_group)
        total = sq.sqrt()
    if max_norm > 0 and math.isfinite(total.item()):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        groups: dict[object, list[torch.Tensor]] = {}
        for g in grads:  # one foreach call per mesh (DTensor ops cannot mix meshes)
            groups.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
        for gs in groups.values():
            torch._foreach_mul_(gs, coef.to(gs[0].device))
    return total


def all_reduce_mean(value: float, group: dist.ProcessGroup | None) -> float:
    """Mean of a Python float over a group (identity without one)."""
    if group is None or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)
