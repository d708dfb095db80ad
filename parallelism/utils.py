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
    # Group by (mesh, placements): with TP + FSDP some gradients live on the 2-D (dp, tp) mesh and
    # others (replicated norms) on the dp mesh only; DTensor ops cannot mix them.
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else ("local",)
        groups.setdefault(key, []).append(g)
    sq = torch.zeros((), dtype=torch.float32)
    for key, group in groups.items():
        if key == ("local",) and all(g.dtype == torch.float32 for g in group):
            # One call over the list (on CPU the same per-tensor norms, with less overhead).
            norms = torch.stack(torch._foreach_norm(group))
        else:
            norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in group])
        norm = torch.linalg.vector_norm(norms)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq = sq + norm.cpu() ** 2
    total = sq.sqrt()
    if pp_group is not None:
        sq = (total**2).to(grads[0].device if grads else "cpu")
        dist.all_reduce(sq, group=pp_group)
        total = sq.sqrt().cpu()
    if max_norm > 0 and math.isfinite(total.item()):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()
        for group in groups.values():
            torch._foreach_mul_(group, coef)
    return total


def all_reduce_mean(value: float, group: dist.ProcessGroup | None) -> float:
    """Mean of a Python float over a group (identity without one)."""
    if group is None or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)
