"""``parallelize_gpt``: apply every parallel technique to the plain GPT (dense or MoE), in a
fixed order; the expert steps apply when the model has MoE layers.

Order (torchtitan's, for the same reasons):
1. tensor parallelism first: it rewrites the parameters into DTensors on the ``tp`` mesh that
   the later steps must see; Ulysses sequence parallelism next (it wraps attention's core, which
   then sees the tp-local heads and splits them further by sp);
   then, for MoE layers: routers replicated over tp, experts sharded over ep (or tp-sharded by
   hidden dim without ep, GRIN's expert tensor parallelism), and the balancing statistics summed
   over ``dp_sp`` (global balancing). Expert sharding precedes FSDP because it turns the expert
   weights into DTensors FSDP must see; with ep > 1 FSDP ignores them (the dispatcher reduces
   their gradients over ``edp``). See ``parallelism/expert_parallel.py`` and docs/moe.md;
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

A pipeline stage of an MoE model is the same model class with the blocks it does not own
removed; its forward carries the running balancing loss to the next stage (``models.moe``).
Routing noise under tp: SparseMixer-v2 samples Gumbel noise from the default generator, which
the trainer seeds identically on every rank and which every tp rank advances identically (the
same ops on the same replicated tensors), as in Megatron.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from models.moe import MoE
from parallelism.data_parallel import apply_ddp, apply_fsdp, needs_ddp, needs_fsdp
from parallelism.dims import ParallelDims
from parallelism.expert_parallel import (
    apply_expert_parallel,
    apply_expert_tensor_parallel,
    apply_global_balancing,
    expert_mesh,
    replicate_routers,
)
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


def has_moe_layers(model: nn.Module) -> bool:
    return any(isinstance(m, MoE) for m in model.modules())


def _model_parallel(dims: ParallelDims) -> bool:
    return dims.tp > 1 or dims.pp > 1


def parallelize_gpt(model: nn.Module, dims: ParallelDims, job: object) -> nn.Module:
    """Split a meta-device GPT / GPTMoE into this rank's pipeline stages (pp > 1), then per
    stage TP -> Ulysses SP -> (MoE: EP / expert TP -> global balancing) -> AC -> compile -> FSDP.

    Returns:
        The model, or a ``parallelism.pipeline.PipelinedGPT`` of its stages.
    """
    moe = has_moe_layers(model)
    emesh = expert_mesh(dims, dims.mesh.device_type) if moe and dims.ep > 1 else None
    if dims.pp > 1:
        from parallelism.pipeline import split_model

        pipelined = split_model(model, dims, job.parallel.pp_virtual)
        for part in pipelined.parts:
            _parallelize_one(part, dims, job, moe, emesh)
        pipelined.refresh()
        return pipelined
    return _parallelize_one(model, dims, job, moe, emesh)


def _parallelize_one(
    model: nn.Module, dims: ParallelDims, job: object, moe: bool, emesh: DeviceMesh | None
) -> nn.Module:
    if dims.tp > 1:
        from parallelism.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, dims.mesh["tp"], job.parallel.sequence_parallel_norms)
    if dims.sp > 1:
        apply_ulysses(model, dims.submesh("sp").get_group())
    ignored = _apply_experts(model, dims, emesh) if moe else []
    if job.train.activation_checkpoint:
        apply_activation_checkpointing(model)
    if job.train.compile:
        apply_compile(model)
    # Replicate-only data parallelism is DDP, except next to model parallelism or expert
    # parallelism (experts are DTensors that DDP cannot leave out of one optimizer's foreach
    # kernels): there FSDP2 on (dp_replicate, dp_shard=1) replicates, as HSDP with no sharding.
    replicate_only = dims.dp_replicate > 1 and (_model_parallel(dims) or dims.ep > 1)
    if needs_fsdp(dims) or replicate_only:
        apply_fsdp(model, dims, ignored_params=set(ignored) or None)
    return model


def _apply_experts(model: nn.Module, dims: ParallelDims, emesh: DeviceMesh | None) -> list:
    """Routers replicated over tp, experts over ep (or expert TP), global balancing; returns
    the expert parameters FSDP must leave alone."""
    ignored: list[nn.Parameter] = []
    if dims.tp > 1:
        replicate_routers(model, dims.mesh["tp"])
    if dims.ep > 1:
        ignored = apply_expert_parallel(model, dims, emesh)
    elif dims.tp > 1:
        apply_expert_tensor_parallel(model, dims.mesh["tp"])
    if dims.dp * dims.sp > 1:
        apply_global_balancing(model, dims.submesh("dp_sp").get_group())
    return ignored


def finalize_data_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Post-initialisation step: DDP for replicated-only layouts without TP/PP."""
    if needs_ddp(dims) and not _model_parallel(dims) and dims.ep == 1:
        model = apply_ddp(model, dims)
    return model
