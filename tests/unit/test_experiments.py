"""Every ``configs/experiment/*.yaml`` composes to the layout it promises, and the trainer's
planning (``plan_run``: everything decided before a process group exists) accepts each one at
its intended world size and rejects it at another. The README's ``--cfg job`` command runs as
written for the 3D and Ulysses examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from parallelism.dims import LayoutError
from train.cli import load_config
from train.trainer import plan_run

ROOT = Path(__file__).resolve().parents[2]

# experiment -> (intended world size, expected config values, micro-batches per step at that size)
EXPECTED: dict[str, tuple[int, dict, int]] = {
    "default": (
        1,
        {"parallel.tp": 1, "parallel.pp": 1, "parallel.dp_shard": -1, "model.name": "gpt"},
        4,
    ),
    "dlrm_synthetic": (1, {"model.name": "dlrm", "data.name": "synthetic_clicks"}, 4),
    "dmt_synthetic": (1, {"model.name": "dmt", "data.name": "synthetic_clicks"}, 4),
    "tp2_pp2_dp2": (
        8,
        {
            "parallel.tp": 2,
            "parallel.pp": 2,
            "parallel.dp_shard": 2,
            "parallel.dp_replicate": 1,
            "parallel.sp": 1,
            "parallel.pp_schedule": "interleaved_1f1b",
            "parallel.pp_virtual": 2,
            "parallel.sequence_parallel_norms": True,
            "model.n_layers": 8,
        },
        4,
    ),
    "tp4_dp2_sp": (
        8,
        {
            "parallel.tp": 4,
            "parallel.pp": 1,
            "parallel.dp_shard": 2,
            "parallel.dp_replicate": 1,
            "parallel.sp": 1,
            "parallel.sequence_parallel_norms": True,
            "model.n_heads": 4,
            "model.n_kv_heads": 4,
        },
        2,
    ),
    "pp4_interleaved_dp2": (
        8,
        {
            "parallel.tp": 1,
            "parallel.pp": 4,
            "parallel.dp_shard": 1,
            "parallel.dp_replicate": 2,
            "parallel.sp": 1,
            "parallel.pp_schedule": "interleaved_1f1b",
            "parallel.pp_virtual": 2,
            "model.n_layers": 8,
        },
        4,
    ),
    "ulysses_sp8": (
        8,
        {
            "parallel.tp": 1,
            "parallel.pp": 1,
            "parallel.dp_shard": 1,
            "parallel.dp_replicate": 1,
            "parallel.sp": 8,
            "train.seq_len": 1024,
            "model.n_heads": 8,
            "model.n_kv_heads": 2,
        },
        4,
    ),
}
MODEL_PARALLEL = [k for k, (world, _, _) in EXPECTED.items() if world == 8]


def test_every_experiment_file_has_an_expectation() -> None:
    files = {p.stem for p in (ROOT / "configs/experiment").glob("*.yaml")}
    assert files == set(EXPECTED), files ^ set(EXPECTED)


def _get(job: object, dotted: str) -> object:
    for part in dotted.split("."):
        job = getattr(job, part)
    return job


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_experiment_composes_to_its_layout(name: str) -> None:
    job, _ = load_config([f"experiment={name}"])
    _, want, _ = EXPECTED[name]
    for key, value in want.items():
        assert _get(job, key) == value, (name, key, _get(job, key))
    assert job.run.name == name and job.run.dir == f"runs/{name}"


@pytest.mark.parametrize("name", MODEL_PARALLEL)
def test_plan_run_accepts_3d_experiment_at_its_world_size(
    name: str, monkeypatch: pytest.MonkeyPatch, tiny_data: str
) -> None:
    world, want, n_micro = EXPECTED[name]
    # one host of 8 ranks (tp groups stay inside it); data.path only avoids the 16 MB corpus
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    job, _ = load_config([f"experiment={name}", f"data.path={tiny_data}"])
    plan = plan_run(job)
    d = plan.dims
    for axis in ("tp", "pp", "sp", "dp_shard", "dp_replicate"):
        assert getattr(d, axis) == want[f"parallel.{axis}"], (name, axis)
    assert d.tp * d.pp * d.sp * d.dp_shard * d.dp_replicate == world
    assert plan.n_micro == n_micro, (name, plan.n_micro)
    assert job.train.global_batch_size == n_micro * job.train.micro_batch_size * d.dp
    # the same file at another world size fails in planning, naming a parallel degree
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(LayoutError, match="world size 4"):
        plan_run(job)


@pytest.mark.parametrize("name", ["default", "dlrm_synthetic", "dmt_synthetic"])
def test_plan_run_accepts_single_process_experiment(
    name: str, monkeypatch: pytest.MonkeyPatch, tiny_data: str
) -> None:
    for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    extra = [f"data.path={tiny_data}"] if name == "default" else []
    job, _ = load_config([f"experiment={name}", *extra])
    plan = plan_run(job)
    assert plan.dims.world_size == 1 and plan.dims.dp == 1
    assert plan.n_micro == EXPECTED[name][2]


@pytest.mark.parametrize("name", ["tp2_pp2_dp2", "ulysses_sp8"])
def test_readme_cfg_job_command_runs_as_written(name: str) -> None:
    """``python -m train experiment=<name> --cfg job`` (README) prints the resolved layout."""
    proc = subprocess.run(
        [sys.executable, "-m", "train", f"experiment={name}", "--cfg", "job"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = OmegaConf.create(proc.stdout)
    for key, value in EXPECTED[name][1].items():
        assert OmegaConf.select(printed, key) == value, (name, key)
