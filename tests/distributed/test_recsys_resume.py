"""Recommenders resume on another topology (issue 15, Must show 1).

A DLRM and a DMT train 8 steps on 4 ranks as 2 hosts x 2, checkpointing at step 4. From that
checkpoint each resumes on 1 host x 4, on 2 ranks and on one process: the resumed steps 5..8 log
the uninterrupted run's losses at 1e-5 and its final validation AUC within 1e-4 (tables move to
their new owners, towers are re-placed on the new host count). Resuming on the same 2 x 2
layout is bit for bit. The DMT resumes read their tower plan from the checkpoint: they are given
a different warm-up length, which would partition differently if the plan were recomputed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.trainer_utils import run_trainer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = [
    "train.steps=8",
    "train.global_batch_size=64",
    "train.micro_batch_size=16",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "train.eval_batches=4",
    "optim.grad_clip=0.5",
    "logging.every=1",
    "logging.progress=false",
    "logging.plot=false",
]
FAMILIES = {
    "dlrm": ["experiment=dlrm_synthetic"],
    "dmt": ["experiment=dmt_synthetic", "model.partition_warmup_steps=30"],
}
# name -> (world size, ranks per host)
LAYOUTS = {"2x2": (4, 2), "1x4": (4, 4), "2": (2, 2), "1": (1, 1)}


def _rank_fn(rank: int, world: int, base: list[str], overrides: list[str]) -> dict:
    return run_trainer(overrides, base)


def _run(family: str, layout: str, extra: list[str]) -> dict:
    world, lws = LAYOUTS[layout]
    base = FAMILIES[family] + COMMON
    if world == 1:
        return run_trainer(extra, base)
    results = run_on_ranks(_rank_fn, world, base, extra, local_world_size=lws, timeout_s=120)
    weights: dict = {}
    for r in results:  # each rank holds its own tables
        weights.update(r["weights"])
    return {**results[0], "weights": weights}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, tuple[dict, Path]] = {}

    def get(family: str) -> tuple[dict, Path]:
        if family not in cache:
            run = tmp_path_factory.mktemp(f"save-{family}")
            extra = [f"run.dir={run}", "checkpoint.enabled=true", "checkpoint.every=4"]
            extra.append("checkpoint.keep_last=0")
            cache[family] = (_run(family, "2x2", extra), run / "checkpoints" / "step_00000004")
        return cache[family]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layout", ["2x2", "1x4", "2", "1"])
def test_recsys_resume_on_another_topology(family, layout, uninterrupted, tmp_path) -> None:
    full, ckpt = uninterrupted(family)
    assert (ckpt / "index.json").exists()
    extra = [f"run.dir={tmp_path}", f"checkpoint.resume={ckpt}"]
    if family == "dmt":
        # The plan must come from the checkpoint, not from a shorter warm-up now.
        extra += [
            "model.partition_warmup_steps=3",
            "checkpoint.allow_model_change=[partition_warmup_steps]",
        ]
    resumed = _run(family, layout, extra)
    want, got = full["losses"][4:], resumed["losses"]
    assert len(got) == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0.0)
    assert abs(resumed["final"]["val_auc"] - full["final"]["val_auc"]) <= 1e-4
    assert resumed["weights"].keys() == full["weights"].keys()
    if layout == "2x2":  # same layout: bit for bit
        assert got == want
        for k, w in full["weights"].items():
            assert torch.equal(resumed["weights"][k], w), k
    else:
        for k, w in full["weights"].items():
            torch.testing.assert_close(resumed["weights"][k], w, rtol=1e-4, atol=1e-6, msg=k)
