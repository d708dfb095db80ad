"""Process life under a launcher: die with the torchrun agent, and stop cleanly on preemption.

**Parent death.** torchrun starts each worker with ``start_new_session=True``, so a SIGKILL of
the agent (or of its process group) leaves the workers running, training and writing beside the
next job. ``die_with_parent`` asks the kernel (``prctl(PR_SET_PDEATHSIG)``, Linux) to SIGKILL
this worker when its parent goes; the standard library has no binding for it, hence ctypes.

**Preemption** (Megatron's ``--exit-signal-handler``, SLURM's ``--signal=USR1@120``). The first
SIGTERM or SIGUSR1 only sets a flag; the trainer checks it after each step, all ranks agree
(one all-reduce of one int per step), write a checkpoint of the current step and exit with
``PREEMPTED_EXIT``, which ``launch/slurm.sbatch`` requeues. A second signal of either kind
exits at once (the default action), so an operator's second Ctrl-C or the launcher's final
SIGTERM is never ignored.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
from pathlib import Path

PREEMPTED_EXIT = 75
"""Exit code after a preemption checkpoint (``EX_TEMPFAIL``: try again later)."""

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux only).

    Returns whether it is armed. A parent that already died before the call (we were
    re-parented) is treated as death: the process exits at once."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)  # the agent died before the request took effect
    return True


def under_launcher() -> bool:
    """Whether a torchrun agent started this process (it sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class PreemptionFlag:
    """The first SIGTERM/SIGUSR1 is recorded; a second one takes the default action."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> bool:
        """Install the handlers (main thread only). Returns whether they are installed."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            self.restore()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def restore(self) -> None:
        """Put back the handlers that were there before ``install``."""
        for sig, old in self._previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._previous = {}


MARKER = "preempted.json"


def launch_identity() -> dict:
    """Which launch and attempt this process belongs to (torchrun's run id and restart count,
    SLURM's job id and requeue count)."""
    env = os.environ
    return {
        "run_id": env.get("TORCHELASTIC_RUN_ID"),
        "restart": int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
        "slurm_job": env.get("SLURM_JOB_ID"),
        "slurm_restart": env.get("SLURM_RESTART_COUNT"),
    }


def agent_of_this_process() -> str:
    """``host:pid`` of the parent (the torchrun agent under torchrun)."""
    return f"{os.uname().nodename}:{os.getppid()}"


def write_marker(run_dir: Path, step: int, signame: str, agents: list[str]) -> None:
    """Record a preemption of this launch (rank 0), so torchrun's restart of it stops."""
    record = {"step": step, "signal": signame, "agents": sorted(set(agents))}
    record.update(launch_identity())
    (Path(run_dir) / MARKER).write_text(json.dumps(record))


def preempted_earlier(run_dir: Path) -> dict | None:
    """The marker, if this process is torchrun's restart of a launch that was preempted (same
    agent and run, later restart, same SLURM attempt); a new launch clears the marker."""
    path = Path(run_dir) / MARKER
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    now = launch_identity()
    same_attempt = (
        now["run_id"] is not None
        and now["restart"] > record.get("restart", 0)
        and all(now[k] == record.get(k) for k in ("run_id", "slurm_job", "slurm_restart"))
        and agent_of_this_process() in record.get("agents", [])
    )
    return record if same_attempt else None


def clear_marker(run_dir: Path) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)


class Preempted(Exception):
    """Raised by the trainer after its preemption checkpoint; ``python -m train`` prints the
    message and exits with ``PREEMPTED_EXIT``."""
