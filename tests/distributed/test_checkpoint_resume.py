"""Universal resume matrix: save after 4 steps on one layout, resume 4 more on another.

Every row's resumed losses and final weights equal an uninterrupted single-process run (fp32);
a row marked ``exact`` (same layout) must reproduce its own uninterrupted run bit for bit.
Adding a layout = one entry in LAYOUTS; adding a resume case = one line in MATRIX.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.trainer_utils import assert_close_runs, run_trainer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BASE = ["train.steps=8", "train.seed=0"]
# Multi-head attention (4 kv heads) so tp=4 and sp=4 layouts are valid for the same model.
GPT = ["train.micro_batch_size=1", "model.n_kv_heads=4"]
# A tiny GRIN MoE with deterministic top-2 routing and the global balancing loss on. The
# balancing loss is per global micro-batch, and which sequences form a global micro-batch
# depends on the data-parallel size when a step accumulates several; so every MoE layout runs
# one global micro-batch of 4 sequences per step (micro_batch_size x data-parallel size = 4).
MOE = [
    "model=gpt_moe",
    *("model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"),
    *("model.n_experts=4", "model.router=softmax", "model.aux_loss_coef=0.1"),
    *("optim.impl=foreach", "optim.eps=1e-5", "train.global_batch_size=4"),
]

GPT4L = ["model.n_layers=4"]

# name -> (overrides, world size)
LAYOUTS: dict[str, tuple[list[str], int]] = {
    "single": ([*GPT, "parallel.dp_replicate=1", "parallel.dp_shard=1"], 1),
    "fsdp2": ([*GPT, "parallel.dp_replicate=1", "parallel.dp_shard=2"], 2),
    "fsdp8": ([*GPT, "parallel.dp_replicate=1", "parallel.dp_shard=8"], 8),
    "hsdp2x2": ([*GPT, "parallel.dp_replicate=2", "parallel.dp_shard=2"], 4),
    "ddp2": ([*GPT, "parallel.dp_replicate=2", "parallel.dp_shard=1"], 2),
    "tp2pp2dp2": ([*GPT, "parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=2"], 8),
    "tp2dp4": ([*GPT, "parallel.tp=2", "parallel.dp_shard=4"], 8),
    "tp4pp2": ([*GPT, "parallel.tp=4", "parallel.pp=2", "parallel.dp_shard=1"], 8),
    "sp4": ([*GPT, "parallel.sp=4", "parallel.dp_shard=1"], 4),
    "sp2": ([*GPT, "parallel.sp=2", "parallel.dp_shard=1"], 2),
    # interleaved 1F1B: 2 ranks x 2 virtual stages need a 4-layer model
    "single4l": ([*GPT, *GPT4L, "parallel.dp_shard=1"], 1),
    "pp2v2": (
        [
            *GPT,
            *GPT4L,
            *("parallel.pp=2", "parallel.pp_virtual=2", "parallel.dp_shard=1"),
            "parallel.pp_schedule=interleaved_1f1b",
        ],
        2,
    ),
    # optimizer state in NVMe files (offload/): saved and restored from wherever it lives
    "offload_nvme": (
        [*GPT, "offload=nvme", "offload.nvme_path=${run.dir}/nvme", "parallel.dp_shard=1"],
        1,
    ),
    "moe_single": ([*MOE, "train.micro_batch_size=4", "parallel.dp_shard=1"], 1),
    "ep2": ([*MOE, "train.micro_batch_size=2", "parallel.dp_shard=2", "parallel.ep=2"], 2),
    "ep4": ([*MOE, "train.micro_batch_size=1", "parallel.dp_shard=4", "parallel.ep=4"], 4),
}

# (save layout, resume layout, exact bit-for-bit)
MATRIX: list[tuple[str, str, bool]] = [
    ("fsdp2", "fsdp2", True),
    ("single", "fsdp2", False),  # (1,1,1) -> FSDP
    ("fsdp8", "fsdp2", False),  # world size 8 -> 2
    ("fsdp2", "fsdp8", False),  # world size 2 -> 8
    ("hsdp2x2", "single", False),  # HSDP 2x2 -> 1 process
    ("ddp2", "hsdp2x2", False),
    ("tp2pp2dp2", "single", False),  # (tp, pp, dp_shard) (2,2,2) -> (1,1,1)
    ("single", "tp2pp2dp2", False),  # (1,1,1) -> (2,2,2)
    ("tp2dp4", "tp4pp2", False),  # (2,1,4) -> (4,2,1)
    ("sp4", "sp2", False),  # Ulysses sp 4 -> 2
    ("pp2v2", "single4l", False),  # virtual pipeline stages -> 1 process
    ("single", "offload_nvme", False),  # plain AdamW state -> NVMe-offloaded state
    ("offload_nvme", "fsdp2", False),  # NVMe-offloaded state -> sharded AdamW
    ("ep2", "ep4", False),  # MoE expert parallel 2 -> 4 (experts re-split across ranks)
    ("ep4", "moe_single", False),  # MoE ep 4 -> one process
    ("ep2", "ep2", True),
    ("tp2pp2dp2", "tp2pp2dp2", True),
]


def _rank_fn(rank: int, world: int, overrides: list[str]) -> dict:
    return run_trainer(overrides)


def _run(layout: str, extra: list[str]) -> dict:
    overrides, world = LAYOUTS[layout]
    args = [*BASE, *overrides, *extra]
    if world == 1:
        return run_trainer(args)
    results = run_on_ranks(_rank_fn, world, args, timeout_s=90)
    weights: dict = {}
    for r in results:  # pipeline ranks each hold their own stages
        weights.update(r["weights"])
    return {**results[0], "weights": weights}


@pytest.fixture(scope="module")
def reference(tiny_data: str, tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted single-process run without checkpointing, per model (cached)."""
    cache: dict[str, dict] = {}

    def get(layout: str) -> dict:
        overrides = LAYOUTS[layout][0]
        single = "moe_single" if "model=gpt_moe" in overrides else "single"
        if "model.n_layers=4" in overrides:
            single = "single4l"
        if single not in cache:
            run = tmp_path_factory.mktemp(f"ref-{single}")
            cache[single] = _run(single, [f"data.path={tiny_data}", f"run.dir={run}"])
        return cache[single]

    return get


@pytest.fixture(scope="module")
def saved(tiny_data: str, tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted 8-step runs that checkpoint every 4 steps, one per layout (cached)."""
    cache: dict[str, tuple[dict, Path]] = {}

    def get(layout: str) -> tuple[dict, Path]:
        if layout not in cache:
            run = tmp_path_factory.mktemp(f"save-{layout}")
            res = _run(
                layout,
                [
                    f"data.path={tiny_data}",
                    f"run.dir={run}",
                    "checkpoint.enabled=true",
                    "checkpoint.every=4",
                    "checkpoint.keep_last=0",
                ],
            )
            cache[layout] = (res, run / "checkpoints" / "step_00000004")
        return cache[layout]

    return get


@pytest.mark.parametrize(("src", "dst", "exact"), MATRIX, ids=[f"{s}_to_{d}" for s, d, _ in MATRIX])
def test_resume_matrix(src, dst, exact, reference, saved, tiny_data, tmp_path) -> None:
    full, ckpt = saved(src)
    assert reference(src) is reference(dst), "a resume case must keep the model"
    reference = reference(src)
    assert (ckpt / "index.json").exists()
    if "model=gpt_moe" in LAYOUTS[src][0]:  # stacked expert weights are labelled in the index
        tensors = json.loads((ckpt / "index.json").read_text())["tensors"]
        experts = {n: t["partitioning"]["expert"] for n, t in tensors.items()}
        assert experts["model/layers.0.feed_forward.experts.w1"] == {"dim": 0, "num_experts": 4}
        assert experts["model/layers.0.feed_forward.router.weight"] is None
    # The checkpointing run itself is unperturbed by the (lazy) saves.
    assert_close_runs(reference, full)
    resumed = _run(
        dst, [f"data.path={tiny_data}", f"run.dir={tmp_path}", f"checkpoint.resume={ckpt}"]
    )
    assert len(resumed["losses"]) == 4  # steps 5..8 only
    assert_close_runs({**reference, "losses": reference["losses"][4:]}, resumed)
    if exact:
        assert resumed["losses"] == full["losses"][4:]
        for k, w in full["weights"].items():
            assert torch.equal(resumed["weights"][k], w), k
