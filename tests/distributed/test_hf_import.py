"""``model.from_hf`` onto tp=2, FSDP2, Ulysses sp=2 and HSDP 2x2: the imported Llama trains
exactly as on one process (each rank reads only its shard's byte ranges; tp x pp with virtual
stages x FSDP against transformers itself: tests/distributed/test_hf_parity.py)."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_on_ranks
from tests.trainer_utils import assert_runs_close, run_trainer
from tests.unit.test_hf_import import save_tiny_llama

pytestmark = pytest.mark.distributed


def _rank(rank: int, world: int, overrides: list[str]) -> dict:
    return run_trainer(overrides)


def _overrides(hf: str, data: str, run: str) -> list[str]:
    # model.n_heads/n_kv_heads in the test base equal the saved config's (4, 2)
    return ["train.steps=2", f"model.from_hf={hf}", f"data.path={data}", f"run.dir={run}"]


@pytest.fixture(scope="module")
def single(tiny_data: str, tmp_path_factory) -> tuple[str, dict]:
    """The saved folder and its one-process run (shared by every layout)."""
    tmp = tmp_path_factory.mktemp("hf_import")
    save_tiny_llama(tmp / "hf")
    hf = str(tmp / "hf")
    return hf, run_trainer(_overrides(hf, tiny_data, str(tmp / "one")))


@pytest.mark.parametrize(
    "world,layout",
    [
        (2, ["parallel.tp=2", "parallel.dp_shard=1"]),
        (2, ["parallel.dp_shard=2"]),
        (2, ["parallel.sp=2", "parallel.dp_shard=1"]),
        (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    ],
    ids=["tp2", "fsdp2", "sp2", "hsdp2x2"],
)
def test_imported_llama_on_a_layout_equals_one_process(
    world, layout, single, tiny_data, tmp_path
) -> None:
    hf, ref = single
    over = [*_overrides(hf, tiny_data, str(tmp_path / "many")), *layout]
    got = run_on_ranks(_rank, world, over)[0]
    assert_runs_close(ref, got)
