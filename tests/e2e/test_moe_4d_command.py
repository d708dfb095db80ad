"""The 8-rank MoE command of ``docs/moe.md`` (issue 19, must-show 1) runs as written and logs the
single-process losses (rel 1e-5) and final validation loss:

    torchrun --nproc_per_node=8 -m train model=gpt_moe parallel.tp=2 parallel.ep=2 \\
        parallel.dp_shard=2 parallel.pp=2 train.steps=3 train.global_batch_size=8 \\
        train.micro_batch_size=1 train.eval_every=0

It used to die in its first pipeline evaluation: torch's pipelining inferred the stage shapes by
running each stage once on uninitialised inputs, which the tensor-parallel ranks of an MoE stage
routed differently (gloo "Received data size doesn't match expected size"). The single process
runs ``train.micro_batch_size=2`` (= dp x 1), so its micro-batch k holds the rows of every data
rank's micro-batch k and the global balancing loss sees the same tokens; the SparseMixer noise
is keyed by global token id, so it is the same on both layouts."""

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
COMMAND = [
    "model=gpt_moe",
    "parallel.tp=2",
    "parallel.ep=2",
    "parallel.dp_shard=2",
    "parallel.pp=2",
    "train.steps=3",
    "train.global_batch_size=8",
    "train.micro_batch_size=1",
    "train.eval_every=0",
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _records(run_dir: Path) -> tuple[list[float], float]:
    recs = read_metrics(run_dir / "metrics.jsonl")
    return [r["loss"] for r in recs if "loss" in r], [r for r in recs if "val_loss" in r][-1][
        "val_loss"
    ]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_moe_tp2_ep2_dp_shard2_pp2_command_equals_single_process(tmp_path: Path) -> None:
    logs = ["logging.every=1", "logging.progress=false", "logging.plot=false"]
    _run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=8"),
            *(f"--master_port={free_port()}", "-m", "train", *COMMAND, *logs),
            f"run.dir={tmp_path / 'ranks8'}",
        ]
    )
    single = [o for o in COMMAND if not o.startswith(("parallel.", "train.micro_batch_size"))]
    _run(
        [
            *(sys.executable, "-m", "train", *single, *logs),
            *("train.micro_batch_size=2", f"run.dir={tmp_path / 'one'}"),
        ]
    )
    got, got_val = _records(tmp_path / "ranks8")
    want, want_val = _records(tmp_path / "one")
    assert len(got) == len(want) == 3, (got, want)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    assert abs(got_val - want_val) <= 1e-5 * want_val, (got_val, want_val)
    assert want[-1] < want[0]  # it trains
