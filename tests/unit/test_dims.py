from __future__ import annotations

import pytest

from parallelism.dims import LayoutError, ParallelDims


def test_fill_dp_shard_and_coordinates() -> None:
    d = ParallelDims(world_size=8, tp=2, pp=2)
    assert (d.dp_replicate, d.dp_shard) == (1, 2)
    assert d.mesh_shape == (2, 1, 2, 1, 2)
    # tp innermost, pp outermost
    assert d.coordinate(1) == {"tp": 1, "sp": 0, "dp_shard": 0, "dp_replicate": 0, "pp": 0}
    assert d.coordinate(4)["pp"] == 1 and d.coordinate(2)["dp_shard"] == 1


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"world_size": 4, "tp": 3}, "parallel.tp"),
        ({"world_size": 4, "dp_shard": 3, "dp_replicate": 1}, "parallel.dp_shard=3"),
        ({"world_size": 4, "dp_shard": -1, "dp_replicate": -1}, "parallel.dp_replicate"),
        ({"world_size": 8, "dp_shard": 2, "sp": 2, "ep": 3, "dp_replicate": -1}, "parallel.ep=3"),
        ({"world_size": 4, "tp": 0}, "parallel.tp=0"),
    ],
)
def test_errors_name_the_field(kw, field) -> None:
    with pytest.raises(LayoutError, match=field.replace(".", r"\.")):
        ParallelDims(**kw)


def test_tp_may_not_span_hosts_unless_allowed() -> None:
    with pytest.raises(LayoutError, match="LOCAL_WORLD_SIZE"):
        ParallelDims(world_size=8, tp=4, local_world_size=2)
    d = ParallelDims(world_size=8, tp=4, local_world_size=2, allow_cross_host_tp=True)
    assert d.dp_shard == 2
    assert ParallelDims(world_size=8, tp=2, local_world_size=4).dp_shard == 4


def _groups(shape: tuple, axis: int) -> list[list[int]]:
    """Rank groups along ``axis`` of a row-major rank grid (as ``init_device_mesh`` lays it)."""
    import torch

    grid = torch.arange(torch.Size(shape).numel()).view(shape).movedim(axis, -1)
    return sorted(grid.reshape(-1, shape[axis]).tolist())


@pytest.mark.parametrize(
    "world,kw",
    [
        (4, {"dp_replicate": 2, "dp_shard": 2, "ep": 4}),  # ep borrows dp_replicate
        (8, {"dp_replicate": 2, "dp_shard": 2, "tp": 2, "ep": 4}),
        (8, {"dp_replicate": 2, "dp_shard": 2, "sp": 2, "ep": 8}),
        (8, {"dp_shard": 2, "tp": 2, "pp": 2, "ep": 2}),
        (16, {"dp_replicate": 2, "dp_shard": 2, "tp": 2, "pp": 2, "ep": 2}),
        (16, {"dp_replicate": 4, "dp_shard": 1, "sp": 2, "tp": 2, "ep": 4}),
    ],
)
def test_expert_groups_match_megatron_core(world: int, kw: dict) -> None:
    """The ep, expert-data-parallel and tp groups of ``expert_mesh_shape`` are the ones
    megatron-core's ``RankGenerator`` builds for its expert layout (order ``tp-cp-ep-dp-pp``,
    expert cp = 1, our sp counted among the data ranks)."""
    rank_generator = pytest.importorskip("megatron.core.parallel_state").RankGenerator
    from parallelism.expert_parallel import expert_mesh_shape

    dims = ParallelDims(world_size=world, **kw)
    shape = expert_mesh_shape(dims)
    pp, edp, ep, tp = shape
    mc = rank_generator(tp=tp, ep=ep, dp=edp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    assert _groups(shape, 2) == sorted(mc.get_ranks("ep"))
    assert _groups(shape, 1) == sorted(mc.get_ranks("dp"))
    assert _groups(shape, 3) == sorted(mc.get_ranks("tp"))
    assert _groups(shape, 0) == sorted(mc.get_ranks("pp"))
    # and the dense mesh's tp/pp groups are the expert mesh's (one rank order for both)
    assert _groups(dims.mesh_shape, 4) == _groups(shape, 3)
    assert _groups(dims.mesh_shape, 0) == _groups(shape, 0)
