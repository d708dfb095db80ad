"""One writer per run directory and checkpoint directory: a lock file that names its holder.

Without it, workers orphaned by a killed torchrun agent (torchrun starts them in their own
sessions, so killing its process group leaves them running) kept training and writing
``checkpoints/`` and ``metrics.jsonl`` beside a relaunched job, and ``latest`` ended up naming
the orphans' step. Rank 0 creates ``<dir>/.lattice.lock`` with ``O_CREAT | O_EXCL`` (atomic on
local and NFSv3+ filesystems) holding ``{pid, host, job, started}``; every rank learns the result
from rank 0 (the caller broadcasts it), so the whole job stops with one line naming the holder.

A lock is stale, and taken over, when its holder cannot be running: the same host and the pid is
gone (or reused by another process, told apart by the kernel's start time), or the same job
(``SLURM_JOB_ID``, else torchrun's ``TORCHELASTIC_RUN_ID`` when it is not the default
``none``), which is a requeued or restarted attempt of this job on any host. No library does
this (``filelock``'s locks are released when the process dies, and ``fcntl`` locks do not hold
across NFS clients reliably), hence the few lines here.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from models.errors import LatticeUserError

LOCK_NAME = ".lattice.lock"


class RunDirBusy(LatticeUserError):
    """Another live job holds the run (or checkpoint) directory."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat), None if not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def job_id() -> str | None:
    """This job's scheduler identity: SLURM's job id, else torchrun's run id (unless default)."""
    slurm = os.environ.get("SLURM_JOB_ID")
    if slurm:
        return f"slurm:{slurm}"
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"torchrun:{run}" if run and run != "none" else None


def holder_record() -> dict:
    """What this process writes into a lock it takes."""
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "job": job_id(),
        "start_time": _start_time(pid),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def is_stale(holder: dict) -> bool:
    """Whether the process that wrote ``holder`` cannot still be running this job."""
    me = holder_record()
    if holder.get("job") and holder.get("job") == me["job"]:
        return True  # a restart or requeue of this very job
    if holder.get("host") != me["host"]:
        return False  # another host's process: we cannot tell, so it holds
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == me["pid"]:
        return pid == me["pid"]
    started = _start_time(pid)
    return started is None or started != holder.get("start_time")


def describe(holder: dict) -> str:
    job = f", job {holder['job']}" if holder.get("job") else ""
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}{job}, since {holder.get('started')}"
    )


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or damaged: no live holder can be named


def _create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def acquire(directory: Path, what: str) -> Path:
    """Take ``directory``'s lock for this process; raise ``RunDirBusy`` naming a live holder.

    ``what`` names the config field the directory comes from (``run.dir``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    record = holder_record()
    for _ in range(3):  # a racing taker may remove and recreate the file between our steps
        if _create(path, record):
            return path
        holder = _read(path)
        if holder is None:
            continue
        if holder and not is_stale(holder):
            raise RunDirBusy(
                f"{what}={directory} is in use by another job ({describe(holder)}): stop that "
                f"job, or give this run another {what}; if that process is gone for good, "
                f"delete {path}"
            )
        path.unlink(missing_ok=True)  # stale: take it over
    raise RunDirBusy(f"could not take {path}: another process keeps recreating it")


def release(path: Path) -> None:
    """Remove the lock at ``path`` if this process still holds it."""
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


class RunLocks:
    """The locks of one run's directories (run dir, and checkpoint dir when outside it)."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def acquire(self, dirs: list[tuple[Path, str]]) -> None:
        """Take every lock, or none: on a refusal the ones taken are released."""
        try:
            for directory, what in dirs:
                self.paths.append(acquire(directory, what))
        except RunDirBusy:
            self.release()
            raise

    def release(self) -> None:
        for path in self.paths:
            release(path)
        self.paths = []
