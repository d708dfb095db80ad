"""The parts of unattended runs, one process each: run-dir locks, the hang verdict and its
exit, the preemption flag and marker, the parent-death signal, the hang-timeout range."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from models.errors import ConfigError
from train.runlock import LOCK_NAME, RunDirBusy, RunLocks, acquire, holder_record, release
from train.signals import launch_identity, preempted_earlier, write_marker
from train.watchdog import HANG_EXIT, laggard

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def no_job(monkeypatch):
    for k in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)


def _write_lock(folder: Path, **fields) -> Path:
    record = {**holder_record(), **fields}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return folder / LOCK_NAME


def test_lock_is_taken_and_released(tmp_path, no_job):
    path = acquire(tmp_path, "run.dir")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release(path)
    assert not path.exists()


def test_live_holder_is_named_and_refused(tmp_path, no_job):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from train.runlock import _start_time

        _write_lock(tmp_path, pid=sleeper.pid, start_time=_start_time(sleeper.pid), job=None)
        with pytest.raises(
            RunDirBusy,
            match=rf"run.dir={tmp_path} is in use by another job "
            rf"\(pid {sleeper.pid} on host {socket.gethostname()}",
        ):
            acquire(tmp_path, "run.dir")
    finally:
        sleeper.kill()
        sleeper.wait()
    # once the holder is gone the lock is stale and taken over
    assert json.loads(acquire(tmp_path, "run.dir").read_text())["pid"] == os.getpid()


def test_reused_pid_and_other_host(tmp_path, no_job):
    _write_lock(tmp_path, pid=os.getppid(), start_time="1", job=None)  # pid reused since
    assert json.loads(acquire(tmp_path, "run.dir").read_text())["pid"] == os.getpid()
    (tmp_path / LOCK_NAME).unlink()
    _write_lock(tmp_path, pid=999_999, host="elsewhere", job=None)  # cannot be checked: holds
    with pytest.raises(RunDirBusy, match="on host elsewhere"):
        acquire(tmp_path, "run.dir")


def test_same_job_takes_over_on_any_host(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_lock(tmp_path, pid=999_999, host="elsewhere", job="slurm:4242")  # requeued job
    assert json.loads(acquire(tmp_path, "run.dir").read_text())["job"] == "slurm:4242"


def test_run_locks_take_all_or_none(tmp_path, no_job):
    a, b = tmp_path / "run", tmp_path / "ckpt"
    b.mkdir()
    _write_lock(b, pid=999_999, host="elsewhere", job=None)
    locks = RunLocks()
    with pytest.raises(RunDirBusy, match=r"checkpoint\.dir"):
        locks.acquire([(a, "run.dir"), (b, "checkpoint.dir")])
    assert not (a / LOCK_NAME).exists()  # the first lock was given back
    release(b / LOCK_NAME)
    assert (b / LOCK_NAME).exists()  # never removes another process's lock


def _beat(rank: int, step: int, since: float, written: float) -> dict:
    return {
        "rank": rank,
        "pid": 100 + rank,
        "host": "h",
        "step": step,
        "phase": "forward_backward",
        "since": since,
        "written": written,
    }


def test_laggard_is_the_silent_rank_then_the_lowest_step():
    now = 1000.0
    beats = {0: _beat(0, 5, 990, 999), 1: _beat(1, 5, 960, 970)}
    assert laggard(beats, now, 7.5, 2).startswith("rank 1 (pid 101 on h) stopped responding 30 s")
    beats = {0: _beat(0, 5, 990, 999), 1: _beat(1, 4, 995, 999), 2: _beat(2, 5, 980, 999)}
    assert laggard(beats, now, 7.5, 3).startswith("rank 1 (pid 101 on h) is behind, at step 4")
    assert laggard(beats, now, 7.5, 4).startswith("rank 3 never wrote a heartbeat")


def test_watchdog_dumps_stacks_and_exits(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from train.watchdog import HangWatchdog
        w = HangWatchdog({str(tmp_path)!r}, rank=0, world=1, timeout_s=1.0, interval_s=0.2)
        w.start()
        w.beat(7, "optimizer step")
        time.sleep(30)
    """)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == HANG_EXIT, proc.stderr
    assert time.time() - t0 < 20
    assert "hang: no progress for 1 s" in proc.stderr and "at step 7 in optimizer step" in (
        proc.stderr
    )
    stacks = (tmp_path / "hang" / "rank_0.txt").read_text()
    assert 'File "<string>", line 7' in stacks and "Thread 0x" in stacks


def test_first_preemption_signal_is_recorded_the_second_exits():
    code = textwrap.dedent("""
        import os, signal, time
        from train.signals import PreemptionFlag
        f = PreemptionFlag()
        assert f.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        print("flag", f.name, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("survived")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == "flag SIGUSR1"
    assert proc.returncode == -signal.SIGTERM


def test_marker_stops_only_torchruns_restart_of_the_preempted_launch(tmp_path, monkeypatch):
    from train.signals import agent_of_this_process

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    write_marker(tmp_path, 8, "SIGUSR1", [agent_of_this_process()])
    assert launch_identity()["restart"] == 0
    assert preempted_earlier(tmp_path) is None  # the preempted attempt itself
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert preempted_earlier(tmp_path)["step"] == 8  # torchrun's restart of it
    write_marker(tmp_path, 8, "SIGUSR1", ["otherhost:1"])
    assert preempted_earlier(tmp_path) is None  # a new launch (another agent)


def test_workers_die_with_their_parent(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        child = (
            "import os, time\\n"
            "from train.signals import die_with_parent\\n"
            "assert die_with_parent()\\n"
            "open({str(pid_file)!r}, 'w').write(str(os.getpid()))\\n"
            "time.sleep(60)\\n"
        )
        subprocess.Popen([sys.executable, "-c", child], start_new_session=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], env=_env())
    try:
        deadline = time.time() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while time.time() < deadline and Path(f"/proc/{child}").exists():
            if Path(f"/proc/{child}/stat").read_text().split(")")[1].split()[0] == "Z":
                break
            time.sleep(0.05)
        gone = not Path(f"/proc/{child}").exists() or (
            Path(f"/proc/{child}/stat").read_text().split(")")[1].split()[0] == "Z"
        )
        assert gone, "the child outlived its parent by 5 s"
    finally:
        proc.kill()


def test_hang_timeout_must_be_below_the_collective_timeout():
    from train.config import JobConfig
    from train.ranges import check_ranges

    job = JobConfig()
    job.parallel.hang_timeout_s, job.parallel.timeout_s = 600.0, 600.0
    with pytest.raises(
        ConfigError,
        match=r"parallel.hang_timeout_s=600 must be below "
        r"parallel.timeout_s=600",
    ):
        check_ranges(job)
    job.parallel.hang_timeout_s = -1.0
    with pytest.raises(ConfigError, match=r"parallel.hang_timeout_s=-1.0 is out of range"):
        check_ranges(job)
    job.parallel.hang_timeout_s = 0.0
    check_ranges(job)
