"""``parallelize_gpt_moe``: the dense GPT's composition (PP -> TP -> Ulysses -> AC -> compile ->
FSDP, ``parallelism.parallelize_gpt``) with expert sharding and global load balancing added.

Order, and why:

1. pipeline split first (``parallelism.pipeline.split_model``, shared with the dense model):
   every later step then applies to one stage as if it were a whole model. The stages become
   ``models.moe.GPTMoEStage``, which pass the running sum of the balancing losses to the next
   stage next to the hidden states, so the last stage's loss includes every layer's balancing
   loss (Megatron instead attaches it to the activations' gradient; carrying it keeps the logged
   loss identical to the unsplit model's).
2. tensor parallelism of the dense parts (``parallelism.tensor_parallel``: attention, vocab-
   parallel embedding and output); the MoE feed-forward is left alone there. The attention
   output is replicated over tp (plain tensor), so the router runs replicated and every tp rank
   routes identically.
3. Ulysses sequence parallelism (wraps attention's core, on the tp-local heads).
4. expert sharding, before FSDP because it turns the expert weights into DTensors FSDP must
   see: with ``ep > 1`` the experts go onto the (edp, ep, tp) mesh, split over ep by expert and
   over tp by hidden dim, and FSDP ignores them (their gradients are reduced over ``edp`` by
   the dispatcher); with ``ep = 1`` and ``tp > 1`` they become tp-sharded DTensors that FSDP
   shards over the data ranks like the other TP parameters (GRIN's expert tensor parallelism:
   one all-reduce of the expert outputs per MoE layer).
5. global balancing: the MoE statistics are summed over ``dp_sp`` (the loss is the global-batch
   one whatever the data layout; tp ranks hold identical statistics and are not summed).
6. activation checkpointing, compile, FSDP (or HSDP) as for the dense model.

Routing noise under tp: SparseMixer-v2 samples Gumbel noise from the default generator, which
the trainer seeds identically on every rank and which every tp rank advances identically (the
same ops run on the same replicated tensors), as in Megatron, whose default RNG stream is the
same across tp ranks. ``parallel.sequence_parallel_norms`` is rejected for ``gpt_moe`` by
``train.moe_spec.validate_gpt_moe`` (the MoE block runs on whole sequences).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallelism.data_parallel import apply_fsdp, needs_fsdp
from parallelism.dims import ParallelDims
from parallelism.expert_parallel import (
    apply_expert_parallel,
    apply_expert_tensor_parallel,
    apply_global_balancing,
    expert_mesh,
    replicate_routers,
)
from parallelism.parallelize_gpt import apply_activation_checkpointing, apply_compile
from parallelism.ulysses import apply_ulysses


def parallelize_gpt_moe(model: nn.Module, dims: ParallelDims, job: object) -> nn.Module:
    """Split a meta-device GPTMoE into this rank's pipeline stages (pp > 1), then per stage
    TP -> Ulysses SP -> EP / expert TP -> global balancing -> AC -> compile -> FSDP.

    Returns:
        The model, or a ``parallelism.pipeline.PipelinedGPT`` of ``GPTMoEStage`` parts.
    """
    emesh = expert_mesh(dims, dims.mesh.device_type) if dims.ep > 1 else None
    if dims.pp > 1:
        from models.moe import GPTMoEStage
        from parallelism.pipeline import split_model

        pipelined = split_model(model, dims, job.parallel.pp_virtual)
        for part in pipelined.parts:
            part.__class__ = GPTMoEStage
            _parallelize_one(part, dims, job, emesh)
        pipelined.refresh()
        return pipelined
    return _parallelize_one(model, dims, job, emesh)


def _parallelize_one(
    model: nn.Module, dims: ParallelDims, job: object, emesh: DeviceMesh | None
) -> nn.Module:
    if dims.tp > 1:
        from parallelism.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, dims.mesh["tp"], job.parallel.sequence_parallel_norms)
    if dims.sp > 1:
        apply_ulysses(model, dims.submesh("sp").get_group())
    ignored: list[nn.Parameter] = []
    if dims.tp > 1:
        replicate_routers(model, dims.mesh["tp"])
    if dims.ep > 1:
        ignored = apply_expert_parallel(model, dims, emesh)
    elif dims.tp > 1:
        apply_expert_tensor_parallel(model, dims.mesh["tp"])
    if dims.dp * dims.sp > 1:
        apply_global_balancing(model, dims.submesh("dp_sp").get_group())
    if job.train.activation_checkpoint:
        apply_activation_checkpointing(model)
    if job.train.compile:
        apply_compile(model)
    model_parallel = dims.tp > 1 or dims.pp > 1
    if needs_fsdp(dims) or (dims.dp_replicate > 1 and model_parallel):
        apply_fsdp(model, dims, ignored_params=set(ignored) or None)
    return model
