"""Data parallelism: DDP (``dp_replicate``), FSDP2 (``dp_shard``, ZeRO-3-like) and HSDP (both).

Built entirely on torch.distributed: ``fully_shard`` over the ``dp_shard_sp`` mesh dimension
(sequence-parallel ranks share parameters, so they shard them too, as DeepSpeed-Ulysses does with
ZeRO), a 2-D (replicate, shard) mesh for HSDP, and the composable ``replicate`` (DDP) when
nothing is sharded. FSDP is applied per transformer block and then to the root, so each block's
all-gather overlaps the previous block's compute.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from parallelism.dims import ParallelDims


def fsdp_mesh(dims: ParallelDims) -> Any:
    """The mesh FSDP2 shards over: (dp_replicate, dp_shard_sp) for HSDP, else dp_shard_sp."""
    if dims.dp_replicate > 1:
        if dims.sp == 1:
            return dims.mesh["dp_replicate", "dp_shard"]
        return dims.mesh["dp_replicate", "dp_shard_sp"]
    return dims.submesh("dp_shard_sp")


def apply_fsdp(
    model: nn.Module,
    dims: ParallelDims,
    reshard_after_forward: bool = True,
    ignored_params: set[nn.Parameter] | None = None,
) -> None:
    """Shard parameters, gradients and optimizer state over the data-parallel ranks (FSDP2).

    ``ignored_params`` (e.g. expert-parallel DTensors) are left to their own layout."""
    mesh = fsdp_mesh(dims)
    mp = MixedPrecisionPolicy()  # fp32 params and reductions; autocast handles compute dtype
    layers = getattr(model, "layers", None)
    if layers is not None:
        blocks = list(layers.values())
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again right away in backward.
            last = i == len(blocks) - 1
            fully_shard(
                block,
                mesh=mesh,
                mp_policy=mp,
                reshard_after_forward=reshard_after_forward and not last,
                ignored_params=ignored_params,
            )
    fully_shard(
        model,
        mesh=mesh,
        mp_policy=mp,
        reshard_after_forward=reshard_after_forward,
        ignored_params=ignored_params,
    )


def apply_ddp(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Replicate the (materialised) model over ``dp_replicate`` with DDP's bucketed all-reduce."""
    from torch.distributed._composable.replicate import replicate

    return replicate(model, device_mesh=dims.submesh("dp_replicate"), bucket_cap_mb=100)


def needs_fsdp(dims: ParallelDims) -> bool:
    """FSDP2 is used whenever parameters are sharded over data or sequence ranks."""
    return dims.dp_shard * dims.sp > 1


def needs_ddp(dims: ParallelDims) -> bool:
    """Plain DDP is used when data is replicated and nothing is sharded."""
    return dims.dp_replicate > 1 and not needs_fsdp(dims)
