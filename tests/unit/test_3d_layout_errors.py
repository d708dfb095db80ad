"""Bad 3D layouts fail in ``plan_run`` (no process group) with one error naming the field."""

from __future__ import annotations

import pytest

from parallelism.dims import LayoutError, ParallelDims
from parallelism.pipeline import stage_indices
from parallelism.tensor_parallel import padded_vocab
from train.cli import load_config
from train.trainer import plan_run

BASE = ["model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2"]


def _plan(monkeypatch, world: int, *overrides: str):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    job, _ = load_config([*BASE, "data.name=shards", "data.path=/nonexistent", *overrides])
    return plan_run(job)


@pytest.mark.parametrize(
    ("world", "overrides", "field"),
    [
        (4, ["parallel.tp=4"], "model.n_kv_heads=2"),
        (
            8,
            ["parallel.tp=8", "model.n_kv_heads=8", "model.n_heads=8", "model.ffn_hidden=36"],
            "model.ffn_hidden",
        ),
        (2, ["parallel.pp=2", "model.n_layers=3"], "model.n_layers=3"),
        (
            4,
            [
                "parallel.pp=2",
                "parallel.pp_schedule=interleaved_1f1b",
                "parallel.pp_virtual=2",
                "model.n_layers=6",
            ],
            "parallel.pp x parallel.pp_virtual",
        ),
        (
            4,
            ["parallel.pp=4", "train.global_batch_size=2", "train.micro_batch_size=1"],
            "< parallel.pp=4",
        ),
        (
            2,
            [
                "parallel.pp=2",
                "parallel.pp_schedule=interleaved_1f1b",
                "parallel.pp_virtual=2",
                "train.global_batch_size=6",
                "train.micro_batch_size=2",
                "model.n_layers=4",
            ],
            "multiple of parallel.pp=2",
        ),
        (2, ["parallel.pp=2", "parallel.pp_virtual=2"], "parallel.pp_virtual=2 needs"),
        (2, ["parallel.pp=2", "parallel.pp_schedule=zb"], "parallel.pp_schedule='zb'"),
        (2, ["parallel.pp=2", "model.tie_embeddings=true"], "model.tie_embeddings"),
        (
            2,
            ["parallel.pp=2", "parallel.pp_microbatches=3", "train.global_batch_size=8"],
            "parallel.pp_microbatches=3",
        ),
        (
            2,
            ["parallel.tp=2", "parallel.sequence_parallel_norms=true", "train.seq_len=15"],
            "train.seq_len=15",
        ),
    ],
)
def test_bad_layouts_fail_before_launch(monkeypatch, world, overrides, field) -> None:
    with pytest.raises(LayoutError, match=f".*{__import__('re').escape(field)}"):
        _plan(monkeypatch, world, *overrides)


def test_good_3d_layout_plans(monkeypatch) -> None:
    with pytest.raises(Exception) as exc:  # only the (missing) data may fail now
        _plan(
            monkeypatch,
            8,
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.dp_shard=2",
            "parallel.pp_schedule=interleaved_1f1b",
            "parallel.pp_virtual=2",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
        )
    assert "data.path" in str(exc.value)


def test_tp_across_hosts_is_rejected() -> None:
    with pytest.raises(LayoutError, match=r"parallel\.tp=4 does not divide the ranks per host"):
        ParallelDims(world_size=8, tp=4, dp_shard=-1, local_world_size=2)
    ParallelDims(world_size=8, tp=4, local_world_size=2, allow_cross_host_tp=True)
    ParallelDims(world_size=8, tp=2, local_world_size=2)


def test_stage_placement_and_padding() -> None:
    assert stage_indices(1, 4, 2) == [1, 5]  # looped (Megatron interleaved) placement
    assert padded_vocab(257, 4) == 260 and padded_vocab(256, 4) == 256
