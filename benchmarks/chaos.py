"""Chaos run: SIGKILL random workers of a checkpointed torchrun job and check nothing is lost.

    python -m benchmarks.chaos                      # 4 ranks, 5 kills, checkpoint.every=2
    python -m benchmarks.chaos --kills 2 --steps 16 # the suite's short version

One uninterrupted run and one chaos run of the same command (4 CPU ranks, FSDP, lazy async
checkpoints every ``k`` steps) under ``torchrun --max-restarts=10``. The chaos run's workers are
SIGKILLed at random moments of three kinds, in a seeded random order:

* ``step``: while training, at a random delay;
* ``save``: while a checkpoint is being written (a ``step_*`` folder without its index);
* ``restart``: while a restarted attempt is starting (its workers exist, no step trained yet).

The run must complete every step and its final weights (the consolidated last checkpoint:
model and optimizer) must equal the uninterrupted run's bit for bit. For every failure the
report gives the steps redone (at most ``k``) and the seconds from the kill until the run was
back at the step it had reached. Results: ``benchmarks/results/chaos.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import RESULTS, write_results
from checkpoint.consolidate import load_consolidated
from checkpoint.format import INDEX, committed_steps
from tests.launch_utils import TINY, kill_all, logged_steps, start, torchrun, workers

KINDS = ("step", "save", "restart")


@dataclass
class Failure:
    kind: str
    """What the run was doing when a worker was killed (``save`` falls back to ``step`` when no
    save was caught in flight, and says so in ``caught``)."""
    caught: bool
    at_step: int
    """The last step logged before the kill."""
    resumed_from: int
    """The step the next attempt resumed from."""
    steps_redone: int
    recovery_s: float | None
    """Seconds from the kill until the run logged a step past ``at_step`` again (None when the
    next kill came during this restart)."""


def overrides(run_dir: Path, steps: int, every: int) -> list[str]:
    return [
        *TINY,
        "model.dim=128",
        "model.n_layers=4",
        f"train.steps={steps}",
        f"run.dir={run_dir}",
        "checkpoint.enabled=true",
        f"checkpoint.every={every}",
        "checkpoint.keep_last=0",
        "parallel.dp_shard=4",
    ]


def _last_step(run_dir: Path) -> int:
    return max(logged_steps(run_dir), default=0)


def _saving(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return any(not (p / INDEX).exists() for p in root.glob("step_*")) if root.exists() else False


def _current_pids(job: subprocess.Popen) -> list[int]:
    return sorted(p.pid for p in workers(job))


def _wait_attempt(job: subprocess.Popen, old: list[int], n: int, timeout: float) -> list[int]:
    """The worker pids of the next attempt (all ``n`` up and none of ``old``)."""
    deadline = time.time() + timeout
    while time.time() < deadline and job.poll() is None:
        pids = _current_pids(job)
        if len(pids) == n and not set(pids) & set(old):
            return pids
        time.sleep(0.02)
    raise RuntimeError(f"no new attempt of {n} workers within {timeout:.0f} s")


def _kill_moment(kind: str, job, run_dir: Path, rng: random.Random, timeout: float) -> bool:
    """Wait for a moment of ``kind``; returns whether it was caught (else: now)."""
    deadline = time.time() + timeout
    if kind == "restart":
        return True  # the caller kills as soon as the new attempt's workers exist
    start_step = _last_step(run_dir)
    if kind == "step":
        target = start_step + rng.randint(1, 3)
        while _last_step(run_dir) < target and time.time() < deadline and job.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        return True
    while time.time() < deadline and job.poll() is None:
        if _saving(run_dir):
            return True
        time.sleep(0.002)
    return False


def chaos_run(run_dir: Path, nproc: int, steps: int, every: int, kills: int, seed: int) -> list:
    rng = random.Random(seed)
    plan = [KINDS[i % len(KINDS)] for i in range(kills)]
    rng.shuffle(plan)
    if plan and plan[0] == "restart":  # the first failure cannot hit a restart
        plan.append(plan.pop(0))
    job = start(torchrun(nproc, overrides(run_dir, steps, every), "--max-restarts=10"))
    failures: list[Failure] = []
    try:
        pids = _wait_attempt(job, [], nproc, 300)
        for i, kind in enumerate(plan):
            if kind == "restart":
                time.sleep(rng.uniform(0.0, 2.0))  # the new attempt is still starting
                caught = _last_step(run_dir) <= failures[-1].at_step
            else:
                caught = _kill_moment(kind, job, run_dir, rng, 120)
            if job.poll() is not None:
                break
            at = _last_step(run_dir)
            killed_at = time.time()
            subprocess.run(["kill", "-9", str(rng.choice(pids))], check=False)
            pids = _wait_attempt(job, pids, nproc, 300)
            resumed = _resumed_step(run_dir, at)
            failure = Failure(kind, caught, at, resumed, at - resumed, None)
            failures.append(failure)
            if i + 1 < len(plan) and plan[i + 1] == "restart":
                continue  # the next kill interrupts this recovery
            failure.recovery_s = _recovery(job, run_dir, at, killed_at)
        job.wait(timeout=900)
    finally:
        if job.poll() is None:
            kill_all(job)
    if job.returncode != 0:
        raise RuntimeError(f"chaos run failed (rc {job.returncode}):\n{job.stdout.read()[-4000:]}")
    return failures


def _resumed_step(run_dir: Path, at: int) -> int:
    """The newest committed step when the next attempt starts (what auto-resume loads)."""
    steps = [int(p.name.split("_")[1]) for p in committed_steps(run_dir / "checkpoints")]
    return max((s for s in steps if s <= at), default=0)


def _recovery(job: subprocess.Popen, run_dir: Path, at: int, killed_at: float) -> float:
    """Seconds until the run logs a step past ``at`` again (the restarted attempt's own)."""
    path = run_dir / "metrics.jsonl"
    before = len(path.read_text().splitlines()) if path.exists() else 0
    while job.poll() is None:
        lines = path.read_text().splitlines() if path.exists() else []
        new = [json.loads(x) for x in lines[before:] if x.strip()]
        if any(r.get("step", 0) > at and "loss" in r for r in new):
            break
        time.sleep(0.05)
    return round(time.time() - killed_at, 1)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_consolidated(committed_steps(run_dir / "checkpoints")[-1])


def reference_run(run_dir: Path, nproc: int, steps: int, every: int) -> float:
    t0 = time.time()
    job = start(torchrun(nproc, overrides(run_dir, steps, every)))
    out, _ = job.communicate(timeout=900)
    if job.returncode != 0:
        raise RuntimeError(f"reference run failed (rc {job.returncode}):\n{out[-4000:]}")
    return time.time() - t0


def compare(ref: Path, run: Path) -> list[str]:
    """Names of the tensors that differ between the two runs' final checkpoints."""
    want, got = final_state(ref), final_state(run)
    if want.keys() != got.keys():
        return sorted(set(want) ^ set(got))
    return [k for k in want if not torch.equal(want[k], got[k])]


def run(work: Path, nproc: int, steps: int, every: int, kills: int, seed: int) -> dict:
    ref_s = reference_run(work / "ref", nproc, steps, every)
    t0 = time.time()
    failures = chaos_run(work / "chaos", nproc, steps, every, kills, seed)
    chaos_s = time.time() - t0
    differ = compare(work / "ref", work / "chaos")
    done = _last_step(work / "chaos")
    return {
        "nproc": nproc,
        "steps": steps,
        "checkpoint_every": every,
        "kills": len(failures),
        "completed_steps": done,
        "bit_identical": not differ,
        "differing_tensors": differ[:20],
        "reference_s": round(ref_s, 1),
        "chaos_s": round(chaos_s, 1),
        "max_steps_redone": max((f.steps_redone for f in failures), default=0),
        "failures": [asdict(f) for f in failures],
    }


def table(r: dict) -> list[dict]:
    return [
        {
            "failure": i + 1,
            "killed during": f["kind"] + ("" if f["caught"] else " (no save caught: mid-step)"),
            "last step logged": f["at_step"],
            "resumed from": f["resumed_from"],
            "steps redone": f["steps_redone"],
            "seconds until back past that step": (
                "killed again while restarting" if f["recovery_s"] is None else f["recovery_s"]
            ),
        }
        for i, f in enumerate(r["failures"])
    ]


def notes(r: dict) -> str:
    return (
        f"{r['kills']} SIGKILLs of random workers, {r['nproc']} CPU ranks, "
        f"checkpoint.every={r['checkpoint_every']}, torchrun --max-restarts=10. Command: "
        f"`python -m benchmarks.chaos`. Completed {r['completed_steps']}/{r['steps']} steps; "
        f"final weights and optimizer state bit-identical to the uninterrupted run: "
        f"**{r['bit_identical']}**; at most {r['max_steps_redone']} steps redone per failure. "
        f"Uninterrupted {r['reference_s']} s, with failures {r['chaos_s']} s (2 CPU cores: "
        f"this machine's times, not a GPU's; the restart is mostly process start-up)."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=2, help="checkpoint.every (k)")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/lattice_chaos")
    ap.add_argument("--out", default="chaos")
    a = ap.parse_args(argv)
    import shutil

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    r = run(work, a.nproc, a.steps, a.every, a.kills, a.seed)
    write_results(a.out, r, table(r), notes(r))
    print(notes(r))
    for row in table(r):
        print(row)
    print(f"results in {RESULTS}/{a.out}.json and .md")
    ok = r["bit_identical"] and r["completed_steps"] == a.steps
    return 0 if ok and r["max_steps_redone"] <= a.every else 1


if __name__ == "__main__":
    raise SystemExit(main())
