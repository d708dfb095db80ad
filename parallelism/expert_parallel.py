"""Expert parallelism, expert tensor parallelism and global load balancing for ``models.moe``.

Follows torchtitan / Megatron-Core's all-to-all token dispatcher and GRIN-MoE's expert sharding:

- ``apply_expert_parallel``: the stacked expert weights (E, ...) become DTensors on a 3-D
  (``edp``, ``ep``, ``tp``) mesh with placements (Replicate, Shard(0), Shard(hidden) or
  Replicate): rank ``r`` of an ep group owns experts [r*E/ep, (r+1)*E/ep). ep ranks are
  borrowed from ``dp_replicate x dp_shard x sp``, innermost first (as ParallelDims validates;
  megatron-core's ``tp-cp-ep-dp-pp`` order); ``edp`` is the rest of the
  data-parallel ranks, over which each expert shard is replicated. Non-expert parameters are
  sharded by FSDP2 over all data ranks as usual (``ignored_params`` keeps FSDP away from the
  expert DTensors).
- ``apply_expert_tensor_parallel`` (tp > 1, ep = 1): the expert weights become DTensors on the
  tp mesh, split over the expert hidden dim, and FSDP2 shards them over the data ranks like
  every other tensor-parallel parameter (2-D).
- ``ExpertParallelDispatcher``: per MoE call, the token counts per (destination rank, local
  expert) are exchanged first (``all_to_all_single`` on the counts), then the sorted tokens
  travel with ``all_to_all_single`` using those split sizes, are regrouped by local expert, run
  through one grouped GEMM, and travel back. Every rank joins every collective even when it
  sends or receives zero tokens, and a local expert that receives none runs on an empty slice,
  so its gradient is an exact zero and nothing hangs.
- Expert gradients: the gradient of a local expert shard sums the contributions of every token
  of its ep group; an autograd hook on the local weight all-reduces it over ``edp`` and divides
  by the data-parallel world (dp x sp) in backward, which is what FSDP does for the other
  parameters, so the update equals the single-process one on the global batch.
- ``apply_global_balancing``: the MoE balancing statistics (expert counts, summed router
  probabilities) are all-reduced over ``dp_sp`` before the product. Its backward multiplies by
  the group size: the loss (and so its gradient) is identical on every rank, and data-parallel
  gradient averaging divides by that size again.
- Expert tensor parallelism (GRIN's way of sharding experts): inside the dispatcher, each
  expert's SwiGLU is split column-wise (w1, w3 over the hidden dim) and row-wise (w2) over the
  tp group; the tp ranks see the same tokens and routing (the attention output is replicated
  over tp), so the only tp collective per MoE layer is one all-reduce of the expert outputs in
  forward (and one of the expert-input gradient in backward): Megatron's f/g operators.
  ``expert_tensor_parallel_forward`` is the same computation as a standalone function.

Written by hand because torch has no MoE dispatcher: the collectives are torch's own
(``all_to_all_single``, ``all_reduce``) wrapped in small autograd functions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module

from models.moe import GroupedExperts, MoE, grouped_matmul
from parallelism.dims import ParallelDims

EXPERT_WEIGHTS = ("w1", "w2", "w3")


# -- autograd collectives ---------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with explicit split sizes; backward swaps the splits."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):  # type: ignore[override]
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        gin = g.new_empty((sum(in_splits), *g.shape[1:]))
        dist.all_to_all_single(gin, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return gin, None, None, None


class _ReduceGradOver(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over ``group`` and divides by
    ``divide``."""

    @staticmethod
    def forward(ctx, x, group, divide):  # type: ignore[override]
        ctx.group, ctx.divide = group, divide
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        g = g.contiguous().clone()
        if ctx.group is not None and dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(g, group=ctx.group)
        return g / ctx.divide, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group``; backward scales by the group size (valid because the upstream
    gradient is the same on every rank: the reduced value feeds a rank-identical loss)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.n = dist.get_world_size(group)
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g * ctx.n, None


class _AllReduceSumTP(torch.autograd.Function):
    """Row-parallel output reduction: sum in forward, identity in backward (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None


class _CopyToTP(torch.autograd.Function):
    """Column-parallel input: identity forward, all-reduce of the input gradient (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


# -- global load balancing --------------------------------------------------------------------
def apply_global_balancing(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Make every MoE layer's balancing statistics global over ``group`` (dp x sp ranks)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    for m in model.modules():
        if isinstance(m, MoE):
            m.stats_reduce = lambda t, g=group: _AllReduceSum.apply(t, g)


# -- expert parallelism -----------------------------------------------------------------------
def expert_mesh_shape(dims: ParallelDims) -> tuple[int, int, int, int]:
    """(pp, edp, ep, tp) of the expert mesh: the ``dp_replicate x dp_shard x sp`` ranks (in
    mesh order) split into (edp, ep) with ep innermost, so ep may span dp_replicate too (ep=4
    on dp_replicate=2 x dp_shard=2); tp as in ``ParallelDims.build_mesh`` (same rank order).
    This is megatron-core's expert layout: its ``tp-cp-ep-dp-pp`` order with cp as sp
    (``tests/unit/test_dims.py`` compares the groups with megatron-core's ``RankGenerator``)."""
    data_ranks = dims.dp_replicate * dims.dp_shard * dims.sp
    return (dims.pp, data_ranks // dims.ep, dims.ep, dims.tp)


def expert_mesh(dims: ParallelDims, device_type: str = "cpu") -> DeviceMesh:
    """The (edp, ep, tp) mesh of ``expert_mesh_shape`` (the default process group must exist)."""
    shape = expert_mesh_shape(dims)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("pp", "edp", "ep", "tp"))
    return mesh["edp", "ep", "tp"]


class ExpertParallelDispatcher:
    """Runs the experts of one MoE call on expert-sorted tokens across ep and tp ranks.

    With ``ep_group``: the token counts, then the tokens, travel by all-to-all to the ranks that
    own the experts, and back. With ``tp_group``: each expert's SwiGLU is split over tp (w1/w3
    column-wise, w2 row-wise); the tp ranks hold identical tokens (and identical routing), run
    their hidden-dim slice, and one all-reduce per MoE call sums the partial outputs (Megatron's
    f/g operators: identity / all-reduce in forward, all-reduce / identity in backward).

    Args:
        ep_group: the expert-parallel group (ep ranks, each owning E/ep experts), or None.
        edp_group: ranks holding the same expert shard when the experts are outside FSDP
            (gradient all-reduce), or None.
        grad_divide: data-parallel world size (dp x sp) those gradients are averaged over.
        tp_group: the tensor-parallel group splitting every expert, or None.
    """

    def __init__(
        self,
        ep_group: dist.ProcessGroup | None,
        edp_group: dist.ProcessGroup | None,
        grad_divide: int,
        tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.ep_group, self.edp_group, self.grad_divide = ep_group, edp_group, grad_divide
        self.tp_group = tp_group
        self.ep = dist.get_world_size(ep_group) if ep_group is not None else 1

    def local_weight(self, w: torch.Tensor) -> torch.Tensor:
        local = w.to_local() if isinstance(w, DTensor) else w
        if self.edp_group is None and self.grad_divide == 1:
            return local
        return _ReduceGradOver.apply(local, self.edp_group, self.grad_divide)

    def _compute(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, experts: GroupedExperts
    ) -> torch.Tensor:
        w1, w2, w3 = (self.local_weight(getattr(experts, n)) for n in EXPERT_WEIGHTS)
        if self.tp_group is None:
            return GroupedExperts.compute(x_ND, counts_E, w1, w2, w3, experts.use_grouped_mm)
        x = _CopyToTP.apply(x_ND, self.tp_group)
        y = GroupedExperts.compute(x, counts_E, w1, w2, w3, experts.use_grouped_mm)
        return _AllReduceSumTP.apply(y, self.tp_group)

    def __call__(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, experts: GroupedExperts
    ) -> torch.Tensor:
        """Args:
            x_ND: (N, D) this rank's token copies sorted by global expert id.
            counts_E: (E,) copies per global expert.
            experts: the module whose w1/w2/w3 are (E, ...) DTensors sharded over ep/tp.

        Returns:
            (N, D) expert outputs in the same order as ``x_ND``.
        """
        if self.ep_group is None:
            return self._compute(x_ND, counts_E, experts)
        ep, E = self.ep, counts_E.numel()
        e_loc = E // ep
        send_RL = counts_E.view(ep, e_loc).to(torch.int64)
        recv_RL = torch.empty_like(send_RL)
        dist.all_to_all_single(recv_RL, send_RL.contiguous(), group=self.ep_group)
        send_cpu, recv_cpu = send_RL.cpu(), recv_RL.cpu()  # one host sync for all split sizes
        in_splits = send_cpu.sum(1).tolist()
        out_splits = recv_cpu.sum(1).tolist()
        x_recv = _AllToAll.apply(x_ND, out_splits, in_splits, self.ep_group)
        # received rows are ordered (source rank, local expert): regroup by local expert
        local_ids = torch.arange(e_loc).repeat(ep).repeat_interleave(recv_cpu.flatten())
        perm = torch.argsort(local_ids, stable=True).to(x_recv.device)
        y_loc = self._compute(x_recv[perm], recv_RL.sum(0), experts)
        y_recv = y_loc[torch.argsort(perm)]
        return _AllToAll.apply(y_recv, in_splits, out_splits, self.ep_group)


# tp splits of the stacked expert weights: w1/w3 (E, D, H) on H, w2 (E, H, D) on H
_TP_DIM = {"w1": 2, "w3": 2, "w2": 1}


def _as_dtensor_param(full: torch.Tensor, mesh: DeviceMesh, placements: tuple) -> nn.Parameter:
    """A meta/empty parameter of ``full``'s logical shape as a DTensor with ``placements``."""
    local_shape = list(full.shape)
    for dim_size, p in zip(mesh.shape, placements):
        if isinstance(p, Shard):
            local_shape[p.dim] //= dim_size
    local = torch.empty(local_shape, device=full.device, dtype=full.dtype)
    return nn.Parameter(
        DTensor.from_local(
            local, mesh, placements, run_check=False, shape=full.shape, stride=full.stride()
        )
    )


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def replicate_routers(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Make every router weight a ``Replicate`` DTensor on the tp mesh (its inputs are
    replicated over tp and its logits returned as plain tensors), so the optimizer sees only
    DTensors on a tensor-parallel model; the gradient is identical on every tp rank and needs
    no reduction (torchtitan's ``NoParallel`` for the MoE gate)."""

    def to_dtensor(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(DTensor.from_local(x, mesh, (Replicate(),), run_check=False) for x in inputs)

    def to_local(mod: nn.Module, out: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        return out.to_local()

    for m in _moe_layers(model):
        distribute_module(m.router, tp_mesh, None, to_dtensor, to_local)


def apply_expert_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split every expert of every MoE layer over ``tp_mesh`` (ep = 1; meta-device model).

    The expert weights become DTensors on the tp mesh (w1/w3 ``Shard(2)``, w2 ``Shard(1)``),
    which FSDP2 then shards over the data-parallel ranks like every other TP parameter.
    """
    tp_group = tp_mesh.get_group()
    dispatcher = ExpertParallelDispatcher(None, None, 1, tp_group)
    for m in _moe_layers(model):
        if m.experts.w1.shape[-1] % tp_mesh.size():
            raise ValueError("the expert hidden size is not divisible by parallel.tp")
        for name in EXPERT_WEIGHTS:
            full = getattr(m.experts, name)
            setattr(m.experts, name, _as_dtensor_param(full, tp_mesh, (Shard(_TP_DIM[name]),)))
        m.dispatcher = dispatcher


def apply_expert_parallel(
    model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None = None
) -> list[nn.Parameter]:
    """Shard every MoE layer's experts over ``parallel.ep`` (and split each over ``parallel.tp``)
    on a meta-device model.

    Args:
        model: a GPTMoE or one pipeline stage of it.
        dims: the layout (ep > 1).
        mesh: the (edp, ep, tp) mesh from ``expert_mesh`` (built once and shared by all of a
            rank's pipeline stages); built here if None.

    Returns:
        The expert parameters (DTensors on the (edp, ep, tp) mesh) that FSDP must ignore.
    """
    mesh = mesh if mesh is not None else expert_mesh(dims, dims.mesh.device_type)
    edp = mesh["edp"].get_group() if mesh["edp"].size() > 1 else None
    tp = mesh["tp"].get_group() if mesh["tp"].size() > 1 else None
    dispatcher = ExpertParallelDispatcher(
        mesh["ep"].get_group(), edp, dims.dp_replicate * dims.dp_shard * dims.sp, tp
    )
    params: list[nn.Parameter] = []
    for m in _moe_layers(model):
        if m.n_experts % dims.ep:
            raise ValueError(f"model.n_experts={m.n_experts} is not divisible by parallel.ep")
        for name in EXPERT_WEIGHTS:
            placements = (Replicate(), Shard(0), Shard(_TP_DIM[name]) if tp else Replicate())
            p = _as_dtensor_param(getattr(m.experts, name), mesh, placements)
            setattr(m.experts, name, p)
            params.append(p)
        m.dispatcher = dispatcher
    return params


# -- expert tensor parallelism ----------------------------------------------------------------
def tp_shard_expert_weights(
    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, rank: int, tp: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This tp rank's slices: w1, w3 (E, D, H) column-split on H; w2 (E, H, D) row-split on H."""
    h = w1.shape[-1] // tp
    sl = slice(rank * h, (rank + 1) * h)
    return w1[..., sl], w2[:, sl, :], w3[..., sl]


def expert_tensor_parallel_forward(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    w1_local: torch.Tensor,
    w2_local: torch.Tensor,
    w3_local: torch.Tensor,
    tp_group: dist.ProcessGroup,
) -> torch.Tensor:
    """Experts split over a tp group (every tp rank sees the same sorted tokens).

    Args:
        x_ND: (N, D) tokens sorted by expert (identical on every tp rank).
        counts_E: (E,) tokens per expert.
        w1_local, w3_local: (E, D, H/tp) column shards; w2_local: (E, H/tp, D) row shard.
        tp_group: the tensor-parallel group.

    Returns:
        (N, D) the full expert outputs on every tp rank (one all-reduce).
    """
    x = _CopyToTP.apply(x_ND, tp_group)
    h = torch.nn.functional.silu(grouped_matmul(x, w1_local, counts_E))
    h = h * grouped_matmul(x, w3_local, counts_E)
    return _AllReduceSumTP.apply(grouped_matmul(h, w2_local, counts_E), tp_group)
