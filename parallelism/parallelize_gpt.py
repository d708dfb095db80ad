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
after initialisation. With tensor or pipeline parallelism, replication uses FSDP2/HSDP over the
data-parallel mesh instead (composable ``replicate`` does not take DTensor parameters, and the
pipeline schedules know how to defer FSDP's gradient reduction to the last micro-batch).
Pipeline parallelism splits the model into this rank's stages first; each stage is then
parallelized like a whole model.
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


def _model_parallel(dims: ParallelDims) -> bool:
    return dims.tp > 1 or dims.pp > 1


def parallelize_gpt(model: nn.Module, dims: ParallelDims, job: object) -> nn.Module:
    """Split into pipeline stages, then per stage TP -> Ulysses SP -> activation checkpointing
    -> compile -> FSDP."""
    if dims.pp > 1:
        from parallelism.pipeline import split_model

        pipelined = split_model(model, dims, job.parallel.pp_virtual)
        for part in pipelined.parts:
            _parallelize_one(part, dims, job)
        pipelined.refresh()
        return pipelined
    return _parallelize_one(model, dims, job)


def _parallelize_one(model: nn.Module, dims: ParallelDims, job: object) -> nn.Module:
    train = job.train
    if dims.tp > 1:
        from parallelism.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, dims.mesh["tp"], job.parallel.sequence_parallel_norms)
    if dims.sp > 1:
        apply_ulysses(model, dims.submesh("sp").get_group())
    if train.activation_checkpoint:
        apply_activation_checkpointing(model)
    if train.compile:
        apply_compile(model)
    if needs_fsdp(dims) or (dims.dp_replicate > 1 and _model_parallel(dims)):
        apply_fsdp(model, dims)
    return model


def finalize_data_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Post-initialisation step: DDP for replicated-only layouts without TP/PP."""
    if needs_ddp(dims) and not _model_parallel(dims):
        model = apply_ddp(model, dims)
    return model
