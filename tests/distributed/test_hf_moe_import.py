"""``model.from_hf`` of a Mixtral and a PhiMoE (biases, LayerNorm, longrope, SparseMixer with
layout-invariant noise) onto tp=2 x dp_shard=2 with ep=2 (4 gloo ranks): the imported MoE
trains exactly as on one process (balancing loss on, ``balance_convention=hf`` pooled over
the data-parallel group; the one-process run equals transformers: tests/unit/test_hf_moe.py)."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_on_ranks
from tests.trainer_utils import assert_runs_close, run_trainer
from tests.unit.test_hf_moe import save_tiny_mixtral, save_tiny_phimoe

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _rank(rank: int, world: int, overrides: list[str]) -> dict:
    return run_trainer(overrides)


@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
def test_imported_moe_on_tp2_ep2_equals_one_process(arch: str, tiny_data, tmp_path) -> None:
    (save_tiny_mixtral if arch == "mixtral" else save_tiny_phimoe)(tmp_path / "hf")
    base = [
        "model=gpt_moe",
        "train.steps=2",
        f"model.from_hf={tmp_path / 'hf'}",
        f"data.path={tiny_data}",
    ]
    # the balancing statistics are global per micro-batch: the reference's micro-batch is the
    # dp=2 ranks' micro-batches together (as in tests/distributed/test_moe_trainer.py)
    ref = run_trainer([*base, "train.micro_batch_size=4", f"run.dir={tmp_path / 'one'}"])
    layout = ["parallel.tp=2", "parallel.dp_shard=2", "parallel.ep=2", "train.micro_batch_size=2"]
    got = run_on_ranks(_rank, 4, [*base, *layout, f"run.dir={tmp_path / 'four'}"])[0]
    assert_runs_close(ref, got)
