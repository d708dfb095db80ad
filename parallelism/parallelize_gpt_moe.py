"""``parallelize_gpt_moe``: the dense GPT order (TP -> activation checkpointing -> compile ->
FSDP) with expert parallelism and global load balancing added.

Order:
1. expert parallelism first: it turns the expert weights into DTensors on the (edp, ep) mesh,
   which FSDP must then leave alone (``ignored_params``);
2. global balancing: the MoE statistics are summed over ``dp_sp`` (whatever the data layout,
   the balancing loss is the one of the global batch);
3. activation checkpointing, compile, FSDP as for the dense model.
"""

from __future__ import annotations

from torch import nn

from parallelism.data_parallel import apply_fsdp, needs_fsdp
from parallelism.dims import ParallelDims
from parallelism.expert_parallel import apply_expert_parallel, apply_global_balancing
from parallelism.parallelize_gpt import apply_activation_checkpointing, apply_compile


def parallelize_gpt_moe(model: nn.Module, dims: ParallelDims, job: object) -> nn.Module:
    """Apply EP -> global balancing -> AC -> compile -> FSDP to a meta-device GPTMoE."""
    ignored: list[nn.Parameter] = []
    if dims.ep > 1:
        ignored = apply_expert_parallel(model, dims)
    if dims.world_size > 1:
        apply_global_balancing(model, dims.mesh["dp_sp"].get_group())
    if job.train.activation_checkpoint:
        apply_activation_checkpointing(model)
    if job.train.compile:
        apply_compile(model)
    if needs_fsdp(dims):
        apply_fsdp(model, dims, ignored_params=set(ignored) or None)
    return model
