"""Recommenders get what the one loop has (issue 15): optimizer-state offload, gradient clipping
and bf16 autocast, each equal to (or, for bf16, close to and different from) the plain run."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.trainer_utils import run_trainer

LOOP = [
    "train.steps=6",
    "train.global_batch_size=64",
    "train.micro_batch_size=16",
    "train.warmup_steps=2",
    "train.eval_batches=2",
    "optim.grad_clip=0.05",  # small enough that every step clips
    "logging.every=1",
    "logging.progress=false",
    "logging.plot=false",
]
BASE = ["experiment=dlrm_synthetic", *LOOP]
DMT = ["experiment=dmt_synthetic", "model.partition_warmup_steps=5", *LOOP]


def _rank_fn(rank: int, world: int, overrides: list[str]) -> dict:
    return run_trainer(overrides, BASE)


def _close(ref: dict, got: dict, rtol: float) -> None:
    torch.testing.assert_close(
        torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=0.0
    )
    for k, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][k], w, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.distributed
def test_dlrm_offload_and_clipping_on_two_ranks_equal_one_process(tmp_path) -> None:
    """Clipped AdamW: one process with plain state == one process with CPU-offloaded state ==
    2 ranks (tables sharded) with offloaded state; every step's norm is above the clip."""
    ref = run_trainer([f"run.dir={tmp_path / 'ref'}"], BASE)
    off = run_trainer([f"run.dir={tmp_path / 'off'}", "offload=cpu"], BASE)
    _close(ref, off, 1e-6)
    ranks = run_on_ranks(_rank_fn, 2, [f"run.dir={tmp_path / 'r2'}", "offload=cpu"])
    got = {**ranks[0], "weights": {**ranks[0]["weights"], **ranks[1]["weights"]}}
    assert got["weights"].keys() == ref["weights"].keys()
    _close(ref, got, 1e-5)


def test_dmt_bf16_autocast_is_honoured(tmp_path) -> None:
    fp32 = run_trainer([f"run.dir={tmp_path / 'fp32'}"], DMT)
    bf16 = run_trainer([f"run.dir={tmp_path / 'bf16'}", "train.dtype=bf16"], DMT)
    a, b = torch.tensor(fp32["losses"]), torch.tensor(bf16["losses"])
    assert not torch.equal(a, b)  # autocast changed the arithmetic
    torch.testing.assert_close(b, a, rtol=2e-2, atol=0.0)
