"""``data.document_mask=true`` on tp=2 x sp=2 (Ulysses) equals the single process with the mask;
the single process with the mask equals each document run alone (tests/unit/test_document_mask)."""

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


def test_document_mask_on_tp2_sp2_equals_single_process(doc_data, tmp_path) -> None:
    ref = _train(_overrides(doc_data, str(tmp_path / "ref"), True))
    plain = _train(_overrides(doc_data, str(tmp_path / "plain"), False))
    # control: the mask changes the computation on this data (documents are shorter than S)
    assert abs(plain["losses"][0] - ref["losses"][0]) > 1e-4
    layout = ["parallel.tp=2", "parallel.sp=2", "parallel.dp_shard=1"]
    over = [*_overrides(doc_data, str(tmp_path / "tp2sp2"), True), *layout]
    got = run_on_ranks(_trainer_rank, 4, over, timeout_s=180)[0]
    assert_runs_close(ref, got)
