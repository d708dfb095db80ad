"""The recommender path through the real entry point: held-out AUC of DMT vs flat DLRM
(Must-show 4) and a 2-host x 2-rank torchrun run that reproduces the single-process losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.harness import free_port

REPO = Path(__file__).resolve().parents[2]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run_inprocess(args: list[str]) -> int:
    from train.__main__ import main

    return main(args)


@pytest.mark.slow
def test_dmt_auc_matches_flat_dlrm_and_planted_best(tmp_path) -> None:
    """Must-show 4: same steps, same data; |AUC_dmt - AUC_dlrm| <= 0.002, both within 0.02 of
    the planted best AUC (``benchmarks/dmt_quality.py`` writes the same run's figures)."""
    from benchmarks.dmt_quality import train_pair

    res = train_pair(tmp_path)
    final = res["final"]
    assert (tmp_path / "dmt" / "tower_plan.yaml").is_file()
    assert final["dlrm"]["best_auc"] == final["dmt"]["best_auc"]
    assert final["dlrm"]["step"] == final["dmt"]["step"] == res["steps"] > 0
    assert abs(final["dmt"]["val_auc"] - final["dlrm"]["val_auc"]) <= 0.002, final
    for m in ("dlrm", "dmt"):
        assert res["best_auc"] - final[m]["val_auc"] <= 0.02, final
        assert final[m]["val_ne"] < 1.0
    assert res["holds"]


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_hosts_matches_single_process(tmp_path) -> None:
    """DMT under torchrun as 2 hosts x 2 local ranks (two static-rendezvous launchers on
    localhost) logs the same per-step losses as one process."""
    overrides = [
        "experiment=dmt_synthetic",
        "model.tower_plan=round_robin",
        "train.steps=3",
        "train.global_batch_size=32",
        "train.micro_batch_size=8",
        "train.eval_batches=1",
        "logging.every=1",
        "logging.progress=false",
        "logging.plot=false",
    ]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={n}",
                "--nproc_per_node=2",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "train",
                f"run.dir={tmp_path / 'tr'}",
                *overrides,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in range(2)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    import torch

    torch.set_num_threads(1)
    assert _run_inprocess([f"run.dir={tmp_path / 'one'}", *overrides]) == 0
    dist_loss = [r["loss"] for r in _records(tmp_path / "tr") if "loss" in r]
    one_loss = [r["loss"] for r in _records(tmp_path / "one") if "loss" in r]
    assert len(dist_loss) == 3
    assert dist_loss == pytest.approx(one_loss, rel=1e-5, abs=1e-6)
    auc_d = [r for r in _records(tmp_path / "tr") if "val_auc" in r][-1]["val_auc"]
    auc_1 = [r for r in _records(tmp_path / "one") if "val_auc" in r][-1]["val_auc"]
    assert auc_d == pytest.approx(auc_1, abs=1e-6)
