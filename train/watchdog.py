"""Hang watchdog (``parallel.hang_timeout_s``): stacks of every live rank and the rank that
fell behind, well before the collective timeout.

A stopped or stuck rank leaves its peers blocked inside a collective until
``parallel.timeout_s`` (minutes) and then dies with no word on where. Here the training loop
marks progress (``beat(step, phase)``) at each phase of a step, and a daemon thread per rank:

* every ``interval`` seconds writes ``run.dir/hang/heartbeat_rank_N.json`` (step, phase, when
  the phase began, pid, host), atomically: the heartbeats name a laggard across hosts through
  the shared run directory, without any collective or store (which a stuck rank may hold);
* when this rank has made no progress for ``hang_timeout_s``, writes every thread's Python
  stack (``faulthandler``) to ``run.dir/hang/rank_N.txt``, reads all heartbeats, prints one
  line naming the rank that fell behind (a heartbeat that stopped: stopped or dead; else the
  lowest step, then the oldest phase) and what it was doing, waits briefly for the other live
  ranks' stack files, and exits with ``HANG_EXIT``. The launcher then ends the job.

torch's own tools do not cover this: NCCL's flight recorder records collectives (NCCL only, no
Python stacks) and ``faulthandler.dump_traceback_later`` dumps only its own process, without
knowing which peer is to blame. A rank whose every thread is stopped (SIGSTOP) cannot write its
own stack; its heartbeat's age says so.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

HANG_EXIT = 3
"""Exit code of a rank that detected a hang."""


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def read_heartbeats(folder: Path) -> dict[int, dict]:
    """Every rank's last heartbeat in ``folder`` (unreadable ones are skipped)."""
    beats: dict[int, dict] = {}
    for path in folder.glob("heartbeat_rank_*.json"):
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        beats[int(beat["rank"])] = beat
    return beats


def laggard(beats: dict[int, dict], now: float, stale_after: float, world: int) -> str:
    """One phrase naming the rank that fell behind and what it was doing."""
    missing = [r for r in range(world) if r not in beats]
    if missing:
        return f"rank {missing[0]} never wrote a heartbeat (it did not start, or its disk is gone)"
    silent = [b for b in beats.values() if now - b["written"] > stale_after]
    if silent:
        b = min(silent, key=lambda b: b["written"])
        return (
            f"rank {b['rank']} (pid {b['pid']} on {b['host']}) stopped responding "
            f"{now - b['written']:.0f} s ago, at step {b['step']} in {b['phase']} "
            f"(stopped, dead, or swapping)"
        )
    b = min(beats.values(), key=lambda b: (b["step"], b["since"]))
    return (
        f"rank {b['rank']} (pid {b['pid']} on {b['host']}) is behind, at step {b['step']} in "
        f"{b['phase']} for {now - b['since']:.0f} s"
    )


class HangWatchdog:
    """Per-rank progress marks, heartbeat files and the hang verdict (see the module doc)."""

    def __init__(
        self, run_dir: Path, rank: int, world: int, timeout_s: float, interval_s: float = 0.0
    ) -> None:
        self.folder = Path(run_dir) / "hang"
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.interval_s = interval_s or max(0.5, min(5.0, timeout_s / 8))
        self.step, self.phase, self.since = 0, "start", time.time()
        self._since_mono = time.monotonic()  # the verdict's clock: immune to wall-clock jumps
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.timeout_s <= 0:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank_{self.rank}.txt").unlink(missing_ok=True)
        self.beat(self.step, self.phase)
        self._write_heartbeat()
        self._thread = threading.Thread(target=self._run, name="lattice-hang-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int, phase: str) -> None:
        """Mark progress: this rank entered ``phase`` of ``step``."""
        self.step, self.phase, self.since = step, phase, time.time()
        self._since_mono = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s)
            self._thread = None

    def _write_heartbeat(self) -> None:
        beat = {
            "rank": self.rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "step": self.step,
            "phase": self.phase,
            "since": self.since,
            "written": time.time(),
        }
        # A full or vanished disk must not kill training; the peers' verdict then says so.
        with contextlib.suppress(OSError):
            _atomic_json(self.folder / f"heartbeat_rank_{self.rank}.json", beat)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write_heartbeat()
            if time.monotonic() - self._since_mono > self.timeout_s:
                self._hang()

    def _hang(self) -> None:
        stuck_for = time.monotonic() - self._since_mono
        path = self.folder / f"rank_{self.rank}.txt"
        with open(path, "w") as f:
            f.write(
                f"rank {self.rank} pid {os.getpid()} on {socket.gethostname()}: no progress for "
                f"{stuck_for:.0f} s, at step {self.step} in {self.phase}\n\n"
            )
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        verdict = laggard(
            read_heartbeats(self.folder), time.time(), 3 * self.interval_s, self.world
        )
        print(
            f"[rank {self.rank}] error: hang: no progress for {stuck_for:.0f} s "
            f"(parallel.hang_timeout_s={self.timeout_s:g}) at step {self.step} in {self.phase}; "
            f"{verdict}; Python stacks in {self.folder}/rank_*.txt",
            file=sys.stderr,
            flush=True,
        )
        self._wait_for_peers(3 * self.interval_s)
        os._exit(HANG_EXIT)

    def _wait_for_peers(self, budget_s: float) -> None:
        """Give the other live ranks a moment to write their stacks before the launcher kills
        them (they detect the hang on their own clocks, within about one interval)."""
        deadline = time.time() + budget_s
        while time.time() < deadline:
            beats = read_heartbeats(self.folder)
            live = [r for r, b in beats.items() if time.time() - b["written"] <= budget_s]
            if all((self.folder / f"rank_{r}.txt").exists() for r in live):
                return
            time.sleep(0.2)
