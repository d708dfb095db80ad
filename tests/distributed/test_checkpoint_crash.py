"""Crash safety: SIGKILL a rank during a save: the rank whose writer is mid-file, a rank that is
not writing, the single process of a run, or rank 0 inside the commit (before the index rename,
between it and the ``latest`` rename). ``latest`` still names a complete checkpoint, which loads
on another layout, and an uncommitted step is never taken for one."""

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


def _spawn(root: Path, world: int, paused: int, hook: str) -> list[subprocess.Popen]:
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
        if r == paused:  # this rank's writer pauses at the hook's point of the step-2 save
            env["CRASH_HOOK"] = hook
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(root)], env=env))
    return procs


MID_SHARD = "pause_after_bytes=4096"  # after 4 KiB of the step-2 shard


@pytest.mark.parametrize(
    ("world", "paused", "victim", "hook", "committed"),
    [
        (2, 1, 1, MID_SHARD, False),
        (2, 1, 0, MID_SHARD, False),
        (1, 0, 0, MID_SHARD, False),
        (2, 0, 0, "pause_at=before_index", False),
        (2, 0, 0, "pause_at=before_latest", True),
    ],
    ids=[
        "rank1_mid_shard",
        "rank0_while_rank1_mid_shard",
        "single_process_mid_shard",
        "rank0_before_index",
        "rank0_between_index_and_latest",
    ],
)
def test_sigkill_mid_save_keeps_previous_checkpoint(
    tmp_path: Path, world: int, paused: int, victim: int, hook: str, committed: bool
):
    root, marker = tmp_path / "ckpts", tmp_path / "paused"
    procs = _spawn(root, world, paused, f"{hook},pause_marker={marker}")
    try:
        deadline = time.time() + 90
        while not marker.exists():
            assert time.time() < deadline, "writer never reached the pause point"
            assert all(p.poll() is None for p in procs), "a rank exited early"
            time.sleep(0.1)
        shard = root / "step_00000002" / "shards" / f"rank_{paused:05d}.bin"
        assert shard.stat().st_size > 0  # the paused rank really is inside the step-2 save
        os.kill(procs[victim].pid, signal.SIGKILL)
        procs[victim].wait(timeout=10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
    assert resolve(root, "latest").name == "step_00000001"
    assert (root / "latest").read_text().strip() == "step_00000001"
    # Killed after the index rename, step 2 is complete (the index is written last) and loads;
    # before it, step 2 has no index and is never mistaken for a checkpoint.
    assert (root / "step_00000002" / "index.json").exists() == committed
    if committed:
        assert load_consolidated(root / "step_00000002")["model/0.weight"].shape == (256, 256)
    # The previous checkpoint is complete: it verifies and loads into one process.
    state = load_consolidated(root / "step_00000001")
    assert state["model/0.weight"].shape == (256, 256)
    from checkpoint import Manager
    from tests.ckpt_utils import args, make

    model, opt = make(seed=5, width=256)
    mgr = Manager(args(root, resume="latest"), root)
    assert mgr.maybe_resume(model, opt) == 1
    assert torch.equal(model[0].weight.detach(), state["model/0.weight"])
