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
