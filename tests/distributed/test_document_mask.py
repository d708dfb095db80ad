"""``data.document_mask=true`` on tp=2 x sp=2 (Ulysses), pp=2 and tp=2 x pp=2 equals the single
process with the mask; the single process with the mask equals each document run alone
(tests/unit/test_document_mask)."""

from __future__ import annotations

import json
import random

import pytest

from tests.distributed.harness import run_on_ranks
from tests.trainer_utils import TINY, assert_runs_close, run_trainer

pytestmark = pytest.mark.distributed

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


@pytest.fixture(scope="module")
def doc_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Byte shards of ~3000 short documents (1-6 words) with EOS between them."""
    from train.prepare import PrepareArgs, prepare

    root = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(3000):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
            f.write(json.dumps({"text": text}) + "\n")
    out = root / "shards"
    prepare(PrepareArgs(out=out, inputs=[root / "docs.jsonl"], tokenizer="bytes", quiet=True))
    return str(out)


def _overrides(data: str, run_dir: str, mask: bool) -> list[str]:
    return [
        "train.steps=4",
        "train.seed=0",
        "train.seq_len=32",
        "data.name=shards",
        f"data.path={data}",
        f"data.document_mask={str(mask).lower()}",
        f"run.dir={run_dir}",
    ]


BASE = [o for o in TINY if not o.startswith("data.max_bytes")]  # stdlib-only field


def _train(overrides: list[str]) -> dict:
    return run_trainer(overrides, base=BASE)


def _trainer_rank(rank: int, world: int, overrides: list[str]) -> dict:
    return _train(overrides)


@pytest.fixture(scope="module")
def masked_ref(doc_data, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The single process with the mask (and the control: the mask changes the computation on
    this data, whose documents are shorter than S)."""
    tmp = tmp_path_factory.mktemp("ref")
    ref = _train(_overrides(doc_data, str(tmp / "ref"), True))
    plain = _train(_overrides(doc_data, str(tmp / "plain"), False))
    assert abs(plain["losses"][0] - ref["losses"][0]) > 1e-4
    return ref


LAYOUTS = {
    "tp2_sp2": ["parallel.tp=2", "parallel.sp=2", "parallel.dp_shard=1"],
    # pipeline stages get the document positions/mask as schedule keyword arguments
    "pp2": ["parallel.pp=2", "parallel.dp_shard=1"],
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=1"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_document_mask_on_a_layout_equals_single_process(
    doc_data, masked_ref, tmp_path, layout: str
) -> None:
    world = 4 if layout != "pp2" else 2
    over = [*_overrides(doc_data, str(tmp_path / layout), True), *LAYOUTS[layout]]
    results = run_on_ranks(_trainer_rank, world, over, timeout_s=180)
    weights: dict = {}
    for r in results:  # pipeline ranks each hold their own stages
        weights.update(r["weights"])
    assert weights.keys() == masked_ref["weights"].keys()
    assert_runs_close(masked_ref, {**results[0], "weights": weights})
