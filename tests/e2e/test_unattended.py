"""Unattended runs under the real launcher: preemption, hangs, a killed agent, two writers.

Each test drives ``python -m train`` under torchrun (or ``launch/run.sh``) on 2 CPU ranks and
acts on the workers the way a cluster does: SIGUSR1 before the time limit, SIGSTOP of a rank,
SIGKILL of the agent, a second job on the same run directory.
"""

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
from checkpoint.format import committed_steps
from tests.distributed.harness import free_port
from tests.launch_utils import (
    ROOT,
    TINY,
    alive,
    env,
    kill_all,
    losses,
    start,
    torchrun,
    wait_for,
    wait_for_step,
    workers,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _overrides(run_dir: Path, data: str, steps: int, *extra: str) -> list[str]:
    return [
        *TINY,
        f"train.steps={steps}",
        f"data.path={data}",
        f"run.dir={run_dir}",
        "checkpoint.enabled=true",
        "checkpoint.every=1000",
        *extra,
    ]


def _complete(cmd: list[str]) -> str:
    """Run ``cmd`` to the end; it must succeed. Returns its output."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_consolidated(committed_steps(run_dir / "checkpoints")[-1])


def test_sigusr1_checkpoints_the_current_step_and_the_resume_is_exact(tiny_data, tmp_path):
    steps = 10
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    _complete(torchrun(2, _overrides(ref_dir, tiny_data, steps)))

    # --max-restarts=1: torchrun's restart of a preempted launch must stop at once, not train.
    job = start(torchrun(2, _overrides(run_dir, tiny_data, steps), "--max-restarts=1"))
    try:
        wait_for_step(job, run_dir, 3)
        os.kill(workers(job)[-1].pid, signal.SIGUSR1)
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            kill_all(job)
    assert job.returncode != 0, out[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("preempted by SIGUSR1 at step"))
    at = int(line.split("at step ")[1].split(":")[0])
    assert 3 <= at < steps, line
    assert [p.name for p in committed_steps(run_dir / "checkpoints")] == [f"step_{at:08d}"]
    assert max(losses(run_dir)) == at  # nothing trained after the checkpoint
    assert "this launch was preempted by SIGUSR1" in out  # the restart stopped, naming why

    again = _complete(torchrun(2, _overrides(run_dir, tiny_data, steps)))
    assert f"step {at}" in again  # the resume line
    assert losses(run_dir) == losses(ref_dir)  # every step, bit for bit
    want, got = _final_state(ref_dir), _final_state(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_sigstop_of_a_rank_ends_the_job_within_60s_with_stacks(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    over = [*_overrides(run_dir, tiny_data, 100_000), "parallel.hang_timeout_s=20"]
    job = subprocess.Popen(
        ["bash", "launch/run.sh", *over],
        cwd=ROOT,
        env=env(NPROC="2", MASTER_PORT=str(free_port()), PYTHON=sys.executable),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stopped = None
    try:
        wait_for_step(job, run_dir, 2)
        stopped = workers(job)[-1]
        os.kill(stopped.pid, signal.SIGSTOP)
        t0 = time.time()
        out, _ = job.communicate(timeout=120)
        took = time.time() - t0
    finally:
        if job.poll() is None:
            kill_all(job, [stopped.pid] if stopped else [])
        if stopped is not None and alive(stopped.pid):
            os.kill(stopped.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert took < 60, f"the job took {took:.0f} s to end after SIGSTOP"
    verdict = next(x for x in out.splitlines() if "error: hang:" in x)
    assert "parallel.hang_timeout_s=20" in verdict
    assert f"rank 1 (pid {stopped.pid}" in verdict and "stopped responding" in verdict, verdict
    stacks = (run_dir / "hang" / "rank_0.txt").read_text()
    assert "no progress for" in stacks and "Thread 0x" in stacks and "File " in stacks, stacks


def test_killed_agent_takes_its_workers_and_a_second_job_is_refused(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job = start(torchrun(2, _overrides(run_dir, tiny_data, 100_000)))
    try:
        wait_for_step(job, run_dir, 1)
        pids = [p.pid for p in workers(job)]
        assert len(pids) == 2

        second = subprocess.run(
            [sys.executable, "-m", "train", *_overrides(run_dir, tiny_data, 3)],
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"run.dir={run_dir} is in use by another job (pid {pids[0]} on host" in (
            second.stderr
        ), second.stderr[-2000:]

        os.kill(job.pid, signal.SIGKILL)
        t0 = time.time()
        wait_for(lambda: not any(alive(p) for p in pids), 5, "the workers to exit")
        assert time.time() - t0 < 5
    finally:
        kill_all(job)
