"""Planner memory against one real step (issue 21, must-show 3): parameters, gradients and
optimizer state within 10%, activations within 25%, on the most loaded rank.

The layouts are ``memory_3d``'s (``benchmarks/tp_comm.py``) with dp_replicate = 1 (replication
does not change a rank's bytes; the benchmark runs them on 8 ranks), an MoE layout with expert
parallelism and an optimizer-offload layout. The measurement (``benchmarks/planner_memory.py``)
counts tensor bytes after the step and the peak of autograd's saved tensors during it.
"""

from __future__ import annotations

import pytest

from benchmarks.planner_memory import KINDS, compare, measure_rank, overrides_for
from tests.distributed.harness import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CASES = [
    ("tp2", 2, ["parallel.tp=2", "parallel.dp_replicate=1"]),
    ("pp2", 2, ["parallel.pp=2", "parallel.dp_replicate=1", "parallel.dp_shard=1"]),
    ("tp2_pp2", 4, ["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=1"]),
    ("moe_ep2_dps2", 2, ["model=gpt_moe", "parallel.ep=2", "parallel.dp_shard=2"]),
    ("offload_cpu_dps2", 2, ["offload=cpu", "parallel.dp_shard=2"]),
]


@pytest.mark.parametrize("name,world,extra", CASES, ids=[c[0] for c in CASES])
def test_planner_memory_matches_one_real_step(name, world, extra, tiny_data, tmp_path) -> None:
    overrides = overrides_for(world, extra, tiny_data, str(tmp_path / name), max_bytes=400_000)
    per_rank = run_on_ranks(measure_rank, world, overrides, timeout_s=300)
    row = compare(name, world, overrides, per_rank)
    assert all(row[k]["measured"] > 0 for k in KINDS), row
    bad = {k: row[k] for k in KINDS if not row[k]["ok"]}
    assert not bad, f"{name}: {bad}"
