"""Rewrite the golden loss files: ``python -m tests.golden.regenerate --why "..." [case ...]``.

Legitimate only when a change *means* to change the math (new init, new data order, a numerics
fix, a torch upgrade that moves fp32 results): never to make a refactor's failing test pass.
The reason is stored in each file and belongs in the commit message too (docs/testing.md).

Each case runs ``--runs`` times (default 2) in fresh folders; a file is written only when every
run logs bit-identical losses and final metrics, so a golden is never a sample of noise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests.golden.runner import CASES, ENV, ROOT, golden_path, rel_diffs, run_case


def git_sha() -> str:
    """HEAD, with ``+dirty`` when tracked files differ from it (the goldens then say so)."""
    git = ["git", "-C", str(ROOT)]
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout
    return sha.strip() + ("+dirty" if dirty.strip() else "")


def run_repeated(name: str, runs: int) -> tuple[list[dict], list[float]]:
    """``runs`` fresh runs of case ``name``: their results and wall times."""
    results, walls = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix=f"golden-{name}-") as tmp:
            t0 = time.perf_counter()
            results.append(run_case(CASES[name], Path(tmp)))
            walls.append(time.perf_counter() - t0)
    return results, walls


def max_run_to_run(results: list[dict]) -> float:
    """Largest relative difference of any loss or final metric between run 0 and another run."""
    ref = results[0]
    worst = 0.0
    for r in results[1:]:
        pairs = rel_diffs(ref["losses"], r["losses"])
        pairs += rel_diffs(list(ref["final"].values()), list(r["final"].values()))
        worst = max([worst, *pairs])
    return worst


def regenerate(name: str, runs: int, why: str) -> bool:
    results, walls = run_repeated(name, runs)
    diff = max_run_to_run(results)
    same = all(r == results[0] for r in results)
    walls_s = ", ".join(f"{w:.1f}" for w in walls)
    print(f"{name}: {runs} runs, wall {walls_s} s, run-to-run max rel diff {diff:.3e}", flush=True)
    if not same:
        print(f"{name}: runs differ, golden NOT written: {results}", file=sys.stderr)
        return False
    case, res = CASES[name], results[0]
    golden = {
        "case": name,
        "command": case.command,
        "overrides": list(case.overrides),
        "env": ENV,
        "losses": res["losses"],
        "final": res["final"],
        "corpus_sha256": res["corpus_sha256"],
        "generated_by": git_sha(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "why": why,
    }
    golden_path(name).write_text(json.dumps(golden, indent=1) + "\n")
    print(f"{name}: wrote {golden_path(name).relative_to(ROOT)}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help=f"default: all of {', '.join(CASES)}")
    ap.add_argument("--why", required=True, help="the math change that makes this legitimate")
    ap.add_argument("--runs", type=int, default=2, help="identical runs required (default 2)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}: choose from {list(CASES)}")
    ok = [regenerate(n, args.runs, args.why) for n in args.cases or CASES]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
