"""The two-rank checkpointed exit, N times in a row: every run must exit 0 and cleanly.

    python -m benchmarks.exit_loop            # 20 runs
    python -m benchmarks.exit_loop --runs 5

Before the fix 1 run in 4 printed "done" and then "terminate called without an active
exception" (SIGABRT): a checkpoint-engine daemon thread (host-ring reserve, snapshot copy, or the
writer's gloo collectives) was still inside a torch C++ call while the interpreter finalized,
and died in ``pthread_exit`` through a noexcept frame. ``Manager.finalize`` now joins every
engine thread (``SnapshotEngine.join``). Results: ``benchmarks/results/exit_loop.{json,md}``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.common import RESULTS, write_results
from tests.launch_utils import ROOT, TINY, env, torchrun


def one_run(run_dir: Path) -> dict:
    over = [
        *TINY,
        "train.steps=4",
        f"run.dir={run_dir}",
        "checkpoint.enabled=true",
        "checkpoint.every=2",
    ]
    t0 = time.time()
    proc = subprocess.run(
        torchrun(2, over), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    return {
        "rc": proc.returncode,
        "done": "done:" in out,
        "abort": "terminate called" in out or "SIGABRT" in out,
        "seconds": round(time.time() - t0, 1),
        "tail": "" if proc.returncode == 0 else out[-1500:],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.exit_loop", description=__doc__)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--work", default="/tmp/lattice_exit_loop")
    a = ap.parse_args(argv)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    runs = []
    for i in range(a.runs):
        runs.append(one_run(work / f"run_{i}"))
        print(f"run {i + 1}/{a.runs}: rc {runs[-1]['rc']}", flush=True)
    failures = [r for r in runs if r["rc"] != 0 or r["abort"] or not r["done"]]
    data = {"runs": a.runs, "failures": len(failures), "failed": failures}
    table = [
        {
            "run": i + 1,
            "rc": r["rc"],
            "done": r["done"],
            "abort": r["abort"],
            "seconds": r["seconds"],
        }
        for i, r in enumerate(runs)
    ]
    notes = (
        f"{a.runs} identical two-rank checkpointed runs (torchrun, gloo, checkpoint.every=2, "
        f"4 steps), one after another; failures (rc != 0, no 'done', or an abort): "
        f"**{len(failures)}**. Command: `python -m benchmarks.exit_loop`."
    )
    write_results("exit_loop", data, table, notes)
    print(notes, f"\nresults in {RESULTS}/exit_loop.json and .md")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
