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
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
        total = torch.linalg.vector_norm(norms)
        if isinstance(total, DTensor):
            total = total.full_tensor()
    else:
        total = torch.zeros(())
    if pp_group is not None:
        sq = total**2
        dist.all_reduce(sq, group=pp_group)
        total = sq.sqrt()
    if max_norm > 0 and math.isfinite(total.item()):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device) if grads else coef)
    return total


def all_reduce_mean(value: float, group: dist.ProcessGroup | None) -> float:
    """Mean of a Python float over a group (identity without one)."""
    if group is None or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)
