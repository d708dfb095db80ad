"""The GPU suite's dry run (issue 21, must-show 5): without a GPU every step is listed as
skipped and the report is written (to a temporary folder, never benchmarks/results)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_suite import BUDGET_S, ROOT, steps


def test_dry_run_lists_every_step_as_skipped(tmp_path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    names = [s.name for s in steps(str(tmp_path))]
    data = json.loads((out / "gpu_suite.json").read_text())
    assert [r["step"] for r in data["steps"]] == names
    assert all(r["status"] == "skipped: no GPU" for r in data["steps"])
    md = (out / "gpu_suite.md").read_text()
    assert all(f"| {n} |" in md and "skipped: no GPU" in md for n in names)
    for part in ("gpu_tests", "default_experiment", "checkpoint_stall", "offload", "moe", "dali"):
        assert any(part in n for n in names)


def test_step_budgets_fit_in_eight_minutes() -> None:
    assert sum(s.timeout_s for s in steps("/tmp")) <= BUDGET_S <= 8 * 60


def test_make_gpu_check_runs_the_suite() -> None:
    text = (ROOT / "Makefile").read_text()
    assert "gpu-check:" in text and "benchmarks/gpu_suite.sh" in text
    assert (ROOT / "benchmarks" / "gpu_suite.sh").stat().st_mode & 0o111
    assert Path(ROOT / "benchmarks" / "gpu_suite.sh").read_text().count("benchmarks.gpu_suite")
