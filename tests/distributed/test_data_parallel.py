"""DDP, FSDP2 and HSDP on gloo ranks equal the single-process run (losses and final weights)."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_on_ranks
from tests.trainer_utils import assert_close_runs, run_trainer

pytestmark = pytest.mark.distributed

STEPS = ["train.steps=5", "train.seed=0"]


def _rank_fn(rank: int, world: int, overrides: list[str]) -> dict:
    return run_trainer(overrides)


@pytest.fixture(scope="module")
def reference(tiny_data: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = tmp_path_factory.mktemp("ref")
    return run_trainer([*STEPS, f"data.path={tiny_data}", f"run.dir={run}"])


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
        ["parallel.dp_replicate=1", "parallel.dp_shard=2"],
        ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
    ],
    ids=["ddp2", "fsdp2", "hsdp2x2"],
)
def test_data_parallel_equals_single_process(layout, reference, tiny_data, tmp_path) -> None:
    world = 4 if "parallel.dp_shard=2" in layout and "parallel.dp_replicate=2" in layout else 2
    overrides = [*STEPS, *layout, f"data.path={tiny_data}", f"run.dir={tmp_path}"]
    results = run_on_ranks(_rank_fn, world, overrides, timeout_s=120)
    assert_close_runs(reference, results[0])
    for r in results[1:]:  # every rank ends with the same full weights
        assert_close_runs(
            {**reference, "losses": results[0]["losses"]}, {**r, "losses": results[0]["losses"]}
        )
