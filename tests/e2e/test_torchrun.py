"""The real entry point under torchrun: data-parallel layouts log the single-process losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.harness import free_port
from tests.launch_utils import TINY
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["train.steps=5", *TINY]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, tiny_data: str) -> list[float]:
    run = tmp_path_factory.mktemp("single")
    subprocess.run(
        [sys.executable, "-m", "train", *COMMON, f"data.path={tiny_data}", f"run.dir={run}"],
        cwd=ROOT,
        env=_env(),
        check=True,
        timeout=300,
    )
    return _losses(run)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.dp_shard=2", "parallel.dp_replicate=2"],
        ["parallel.dp_replicate=4", "parallel.dp_shard=1"],
        ["parallel.dp_shard=4"],
    ],
    ids=["hsdp2x2", "ddp4", "fsdp4"],
)
def test_torchrun_matches_single_process(layout, single, tiny_data, tmp_path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=4",
        f"--master_port={free_port()}",
        "-m",
        "train",
        *COMMON,
        *layout,
        f"data.path={tiny_data}",
        f"run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _losses(tmp_path)
    assert len(got) == len(single) == 5
    for a, b in zip(got, single):
        assert abs(a - b) <= 1e-5 * abs(b), (got, single)
    assert (tmp_path / "config.yaml").is_file()
