"""Crash safety: SIGKILL a rank, or the process whose background writer is mid-file, during a
save; ``latest`` still names the previous complete checkpoint, which loads on another layout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoint.consolidate import load_consolidated
from checkpoint.format import resolve
from tests.distributed.harness import free_port

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("ckpt_crash_worker.py")


def _spawn(root: Path, world: int, victim: int, marker: Path) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for r in range(world):
        env = {
            **os.environ,
            "RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(r),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        if r == victim:  # this rank's writer pauses after 4 KiB of the step-2 shard
            env["CRASH_HOOK"] = f"pause_after_bytes=4096,pause_marker={marker}"
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(root)], env=env))
    return procs


@pytest.mark.parametrize(
    ("world", "victim"), [(2, 1), (1, 0)], ids=["sigkill_rank1_of_2", "sigkill_writer_process"]
)
def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path: Path, world: int, victim: int):
    root, marker = tmp_path / "ckpts", tmp_path / "paused"
    procs = _spawn(root, world, victim, marker)
    try:
        deadline = time.time() + 90
        while not marker.exists():
            assert time.time() < deadline, "writer never reached the pause point"
            assert all(p.poll() is None for p in procs), "a rank exited early"
            time.sleep(0.1)
        shard = root / "step_00000002" / "shards" / f"rank_{victim:05d}.bin"
        assert shard.stat().st_size > 0  # the victim really is mid-write
        os.kill(procs[victim].pid, signal.SIGKILL)
        procs[victim].wait(timeout=10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
    assert resolve(root, "latest").name == "step_00000001"
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert not (root / "step_00000002" / "index.json").exists()
    # The previous checkpoint is complete: it verifies and loads into one process.
    state = load_consolidated(root / "step_00000001")
    assert state["model/0.weight"].shape == (256, 256)
    from checkpoint import Manager
    from tests.ckpt_utils import args, make

    model, opt = make(seed=5, width=256)
    mgr = Manager(args(root, resume="latest"), root)
    assert mgr.maybe_resume(model, opt) == 1
    assert torch.equal(model[0].weight.detach(), state["model/0.weight"])
