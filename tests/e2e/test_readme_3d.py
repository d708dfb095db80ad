"""The README's 8-rank 3D command runs as written on CPU (issue 3, must-show 6):
``torchrun --nproc_per_node=8 -m train experiment=tp2_pp2_dp2 ... parallel.backend=gloo`` (tp2 x
pp2 interleaved x FSDP 2, sequence-parallel norms), shortened to 2 steps, logs the per-step losses
and final validation loss of the single-process run of the same experiment (rel 1e-5). Besides
``train.steps`` only ``run.dir`` and a free rendezvous port differ from the README."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import free_port
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
SINGLE = [  # the same experiment on one process
    "parallel.tp=1",
    "parallel.pp=1",
    "parallel.dp_shard=1",
    "parallel.pp_schedule=1f1b",
    "parallel.pp_virtual=1",
    "parallel.sequence_parallel_norms=false",
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _records(run_dir: Path) -> tuple[list[float], dict]:
    recs = read_metrics(run_dir / "metrics.jsonl")
    return [r["loss"] for r in recs if "loss" in r], [r for r in recs if "val_loss" in r][-1]


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_8_rank_3d_command_equals_single_process(tmp_path: Path) -> None:
    common = ["experiment=tp2_pp2_dp2", f"train.steps={STEPS}"]
    ranks = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=8"),
        *(f"--master_port={free_port()}", "-m", "train"),
        *common,
        "parallel.backend=gloo",
        f"run.dir={tmp_path / 'ranks8'}",
    ]
    proc = subprocess.run(ranks, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = [sys.executable, "-m", "train", *common, *SINGLE, f"run.dir={tmp_path / 'one'}"]
    ref = subprocess.run(single, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    got, got_val = _records(tmp_path / "ranks8")
    want, want_val = _records(tmp_path / "one")
    assert len(got) == len(want) == STEPS, (got, want)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    assert abs(got_val["val_loss"] - want_val["val_loss"]) <= 1e-5 * want_val["val_loss"]
    assert want[-1] < want[0]  # it trains
    layout = "layout: {'pp': 2, 'dp_replicate': 1, 'dp_shard': 2, 'sp': 1, 'tp': 2}"
    assert layout in (proc.stdout + proc.stderr)  # the header names each degree
