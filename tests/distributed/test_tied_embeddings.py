"""``model.tie_embeddings=true`` really ties: one tensor, trained as one, on one process, FSDP and
tensor parallelism (``Module.to_empty`` used to untie them at materialisation, so the output
projection trained as a separate matrix)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.trainer_utils import assert_runs_close, run_trainer

pytestmark = pytest.mark.distributed

STEPS = ["train.steps=3", "train.seed=0", "model.tie_embeddings=true"]


def _rank(rank: int, world: int, overrides: list[str]) -> dict:
    return run_trainer(overrides)


@pytest.fixture(scope="module")
def single(tiny_data, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("tied")
    return run_trainer([*STEPS, f"data.path={tiny_data}", f"run.dir={run}"])


def test_single_process_keeps_one_tensor(single) -> None:
    w = single["weights"]
    assert "output.weight" not in w or torch.equal(w["output.weight"], w["tok_embeddings.weight"])


@pytest.mark.parametrize(
    "layout",
    [["parallel.dp_shard=2"], ["parallel.tp=2", "parallel.dp_shard=1"]],
    ids=["fsdp2", "tp2"],
)
def test_tied_layouts_equal_single_process(layout, single, tiny_data, tmp_path) -> None:
    over = [*STEPS, *layout, f"data.path={tiny_data}", f"run.dir={tmp_path}"]
    got = run_on_ranks(_rank, 2, over, timeout_s=120)[0]
    assert_runs_close(single, got)
