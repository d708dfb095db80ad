"""``parallelize_gpt``: apply every parallel technique to the plain GPT, in a fixed order.

Order (torchtitan's, for the same reasons):
1. tensor parallelism first: it rewrites the parameters into DTensors on the ``tp`` mesh that
   the later steps must see; Ulysses sequence parallelism next (it wraps attention's core, which
   then sees the tp-local heads and splits them further by sp);
2. activation checkpointing: wraps whole (already tensor-parallel) blocks;
3. ``torch.compile`` per block: compiles the wrapped block, collectives included;
4. data parallelism last: FSDP2 shards whatever parameters the earlier steps produced (2-D with
   TP), on the meta device so full weights never exist on one rank.
DDP (replication only) needs materialised weights and is applied by ``finalize_data_parallel``
after initialisation.
"""

from __future__ import annotations

from torch import nn

from parallelism.data_parallel import apply_ddp, apply_fsdp, needs_ddp, needs_fsdp
from parallelism.dims import ParallelDims
from parallelism.ulysses import apply_ulysses


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in backward (torch's checkpoint wrapper, non-reentrant)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in list(model.layers.items()):
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately (identical blocks share one compiled graph)."""
    import torch

    for key, block in list(model.layers.items()):
        model.layers[key] = torch.compile(block, fullgraph=False)


def parallelize_gpt(model: nn.Module, dims: ParallelDims, job: object) -> nn.Module:
    """Apply TP -> Ulysses SP -> activation checkpointing -> compile -> FSDP to a meta GPT."""
    train = job.train
    if dims.sp > 1:
        apply_ulysses(model, dims.submesh("sp").get_group())
    if train.activation_checkpoint:
        apply_activation_checkpointing(model)
    if train.compile:
        apply_compile(model)
    if needs_fsdp(dims):
        apply_fsdp(model, dims)
    return model


def finalize_data_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Post-initialisation step: DDP for replicated-only layouts."""
    if needs_ddp(dims):
        model = apply_ddp(model, dims)
    return model
