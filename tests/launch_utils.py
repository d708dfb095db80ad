"""Launch the real entry point under torchrun (or launch/run.sh) and act on its workers.

Shared by the unattended-run tests and ``benchmarks/chaos.py``: a job is a Popen of the
launcher; its workers are the launcher's child processes (torchrun starts them in their own
sessions, so they are found by parent pid, not process group).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.distributed.harness import free_port
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "train.seed=0",
    "train.seq_len=32",
    "train.eval_every=0",
    "train.eval_batches=1",
    "logging.every=1",
    "logging.progress=false",
    "logging.plot=false",
    "model.dim=64",
    "model.n_layers=2",
]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def torchrun(nproc: int, overrides: list[str], *launcher_args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *launcher_args,
        "-m",
        "train",
        *overrides,
    ]


def start(cmd: list[str], **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def workers(job: subprocess.Popen | int) -> list[psutil.Process]:
    """The launcher's worker processes (python -m train), oldest first."""
    pid = job if isinstance(job, int) else job.pid
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if _is_worker(p)]


def _is_worker(p: psutil.Process) -> bool:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return False
    return "train" in cmd and "-m" in cmd and "torch.distributed.run" not in cmd


def logged_steps(run_dir: Path) -> list[int]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in read_metrics(path) if "loss" in r]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged loss (a resumed run's later lines win)."""
    return {
        r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r
    }


def wait_for(pred, timeout: float, what: str, job: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if job is not None and job.poll() is not None:
            out = job.stdout.read() if job.stdout else ""
            raise AssertionError(f"job ended (rc {job.returncode}) before {what}:\n{out[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_step(job: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    wait_for(lambda: max(logged_steps(run_dir), default=0) >= step, timeout, f"step {step}", job)


def kill_all(job: subprocess.Popen, pids: list[int] = ()) -> None:
    """SIGKILL the launcher, its workers and ``pids`` (cleanup; ignores the already gone)."""
    targets = [job.pid, *[p.pid for p in workers(job)], *pids]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    job.wait(timeout=30)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
