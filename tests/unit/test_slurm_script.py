"""``launch/slurm.sbatch``'s requeue logic, with stand-ins for srun, scancel and scontrol.

The stand-in srun plays the job step: it records its pid, runs until SIGUSR1 (then exits 75,
as the workers do after their preemption checkpoint) or exits with ``FAKE_RC``. The stand-ins
of scancel and scontrol log their arguments, so the test sees the forwarded signal and the
requeue the script asks SLURM for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKES = {
    "srun": """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
echo $$ > "$FAKE_DIR/step.pid"
trap 'echo "step got USR1" >> "$FAKE_LOG"; exit 75' USR1
if [ -n "${FAKE_RC:-}" ]; then exit "$FAKE_RC"; fi
for _ in $(seq 600); do sleep 0.1; done
""",
    "scancel": """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_LOG"
kill -USR1 "$(cat "$FAKE_DIR/step.pid")"
""",
    "scontrol": """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
if [ "$1" = show ]; then echo node0; fi
""",
}


def _run(tmp_path: Path, preempt: bool, rc: str = "") -> tuple[int, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_DIR": str(tmp_path),
        "FAKE_RC": rc,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    job = subprocess.Popen(
        ["bash", "launch/slurm.sbatch", "train.steps=5"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if preempt:
        deadline = time.time() + 20
        while not (tmp_path / "step.pid").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does
    job.communicate(timeout=60)
    return job.returncode, log.read_text().splitlines()


def test_time_limit_signal_is_forwarded_and_the_job_requeued(tmp_path):
    rc, log = _run(tmp_path, preempt=True)
    assert rc == 0
    assert log[0].startswith("scontrol show hostnames")
    assert "launch/run.sh train.steps=5" in log[1]
    assert log[2:] == ["scancel --signal=USR1 4242", "step got USR1", "scontrol requeue 4242"]


@pytest.mark.parametrize("rc", ["0", "1"])
def test_a_finished_or_failed_run_is_not_requeued(tmp_path, rc):
    got, log = _run(tmp_path, preempt=False, rc=rc)
    assert got == int(rc)
    assert not any("requeue" in line for line in log)


def test_a_step_that_exits_75_is_requeued(tmp_path):
    rc, log = _run(tmp_path, preempt=False, rc="75")
    assert rc == 0 and log[-1] == "scontrol requeue 4242"
