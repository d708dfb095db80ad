"""Ulysses sequence parallelism equals the single-process run; all-to-all layout round trips."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_on_ranks
from tests.trainer_utils import assert_close_runs, run_trainer

pytestmark = pytest.mark.distributed

STEPS = ["train.steps=5", "train.seed=0", "train.seq_len=32"]


def _trainer_rank(rank: int, world: int, overrides: list[str]) -> dict:
    return run_trainer(overrides)


@pytest.fixture(scope="module")
def reference(tiny_data: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {
        kv: run_trainer(
            [
                *STEPS,
                f"model.n_kv_heads={kv}",
                f"data.path={tiny_data}",
                f"run.dir={tmp_path_factory.mktemp('ref')}",
            ]
        )
        for kv in (2, 1)
    }


@pytest.mark.parametrize(
    "world,layout,kv",
    [
        (2, ["parallel.sp=2", "parallel.dp_shard=1"], 2),
        (4, ["parallel.sp=4", "parallel.dp_shard=1"], 2),  # GQA: 2 kv heads < sp=4 -> replicated
        (4, ["parallel.sp=4", "parallel.dp_shard=1"], 1),  # MQA: 1 kv head
        (4, ["parallel.sp=2", "parallel.dp_shard=2"], 2),
    ],
    ids=["sp2", "sp4-gqa", "sp4-mqa", "sp2-dpshard2"],
)
def test_ulysses_equals_single_process(world, layout, kv, reference, tiny_data, tmp_path) -> None:
    overrides = [
        *STEPS,
        *layout,
        f"model.n_kv_heads={kv}",
        f"data.path={tiny_data}",
        f"run.dir={tmp_path}",
    ]
    results = run_on_ranks(_trainer_rank, world, overrides, timeout_s=120)
    assert_close_runs(reference[kv], results[0])


def _roundtrip(rank: int, world: int) -> None:
    from parallelism.ulysses import head_to_seq, seq_to_head

    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 8 * world, 4 * world, 3, generator=g)  # (B, S, H, D) on every rank
    s = full.shape[1] // world
    mine = full[:, rank * s : (rank + 1) * s]
    heads = seq_to_head(mine, dist.group.WORLD)
    h = full.shape[2] // world
    torch.testing.assert_close(heads, full[:, :, rank * h : (rank + 1) * h], rtol=0, atol=0)
    torch.testing.assert_close(head_to_seq(heads, dist.group.WORLD), mine, rtol=0, atol=0)


def test_all_to_all_swaps_sequence_and_head_sharding() -> None:
    run_on_ranks(_roundtrip, 4, timeout_s=60)


# -- composition with tensor, pipeline and data parallelism ---------------------------------------
def _composed_rank(rank: int, world: int, overrides: list[str], run_dir: str) -> tuple:
    from tests.distributed.test_3d import train_and_gather

    return train_and_gather(overrides, run_dir)


@pytest.fixture(scope="module")
def composed_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from tests.distributed.test_3d import base_overrides, train_and_gather

    tmp = tmp_path_factory.mktemp("uly3d")
    base = base_overrides(str(tmp / "data"))
    ref = train_and_gather(
        [*base, "parallel.dp_shard=1", "train.micro_batch_size=2"], str(tmp / "ref")
    )
    return base, str(tmp), ref


@pytest.mark.slow
@pytest.mark.parametrize(
    "world,layout",
    [
        (4, ["parallel.sp=2", "parallel.tp=2", "parallel.dp_shard=1", "train.micro_batch_size=2"]),
        (
            8,
            [
                "parallel.sp=2",
                "parallel.dp_shard=2",
                "parallel.pp=2",
                "parallel.pp_schedule=1f1b",
                "train.micro_batch_size=2",
            ],
        ),
    ],
    ids=["sp2-tp2", "sp2-dpshard2-pp2"],
)
def test_ulysses_composes_with_tp_pp_dp(world, layout, composed_reference) -> None:
    from tests.distributed.test_3d import _check

    base, tmp, ref = composed_reference
    per_rank = run_on_ranks(
        _composed_rank, world, [*base, *layout], f"{tmp}/run{world}", timeout_s=120
    )
    _check(tuple(layout), per_rank, ref)


# -- against DeepSpeed's own Ulysses layer ---------------------------------------------------------
def _vs_deepspeed_rank(rank: int, world: int, shapes: list[tuple[int, int, int, int, int]]) -> list:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    from models.gpt import CoreAttention
    from parallelism.ulysses import UlyssesAttention, sequence_slice

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    group = dist.group.WORLD
    ours = UlyssesAttention(CoreAttention(), group)
    theirs = DistributedAttention(CoreAttention(), group, scatter_idx=2, gather_idx=1)
    results = []
    for B, S, H, K, D in shapes:
        g = torch.Generator().manual_seed(0)
        full = [torch.randn(B, S, n, D, generator=g) for n in (H, K, K)]
        grad_out = torch.randn(B, S, H, D, generator=g)
        sl = sequence_slice(S, rank, world)
        runs = []
        for call in (
            lambda q, k, v: ours(q, k, v),
            lambda q, k, v: theirs(q, k, v, batch_dim_idx=0),
            None,  # single-process reference on the whole sequence
        ):
            inputs = [(t if call is None else t[:, sl]).clone().requires_grad_() for t in full]
            if call is None:
                out = CoreAttention()(*inputs)
                out.backward(grad_out)
                out, grads = out[:, sl], [t.grad[:, sl] for t in inputs]
            else:
                out = call(*inputs)
                out.backward(grad_out[:, sl])
                grads = [t.grad for t in inputs]
            runs.append([out.detach(), *grads])
        results.append(runs)
    return results


def test_matches_deepspeed_distributed_attention() -> None:
    """Same outputs and q/k/v gradients as ``deepspeed.sequence.layer.DistributedAttention`` (and
    as single-process attention) on identical inputs, 2 gloo ranks, MHA and GQA."""
    pytest.importorskip("deepspeed")
    shapes = [(2, 64, 4, 4, 8), (2, 64, 4, 2, 8)]  # (B, S, H, kv heads, D)
    for per_shape in run_on_ranks(_vs_deepspeed_rank, 2, shapes, timeout_s=120):
        for ours, theirs, ref in per_shape:
            for a, b, c in zip(ours, theirs, ref):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
