"""``python -m tests.matrix.run`` (``make test-matrix``): the whole layout matrix, or ``--subset``
(the CI subset), against the single process; writes ``benchmarks/results/layout_matrix.{json,md}``
(layout, pass/fail, max differences, seconds) and exits non-zero on any failure."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tests.matrix.layouts import STEPS, enumerate_layouts, expected_error, pairwise_subset
from tests.matrix.runner import Outcome, base_overrides, check_invalid, run_valid

ROOT = Path(__file__).resolve().parents[2]


def _row(o: Outcome) -> dict:
    lay = o.layout
    return {
        "layout": lay.name,
        "world": lay.world,
        "valid": o.expected is None,
        "passed": o.passed,
        "loss_rel_diff": o.loss_rel_diff,
        "weight_abs_diff": o.weight_abs_diff,
        "seconds": round(o.seconds, 2),
        "seed": o.seed,
        "detail": o.detail[:300],
    }


def _status(row: dict) -> str:
    if row["detail"] == "reference":
        return "reference (the single process)"
    return "pass" if row["passed"] else "FAIL"


def write(outcomes: list[Outcome], out: Path, title: str, wall: float) -> None:
    rows = [_row(o) for o in outcomes]
    valid = [r for r in rows if r["valid"]]
    compared = [r for r in valid if r["detail"] != "reference"]
    invalid = [r for r in rows if not r["valid"]]
    fails = [r for r in rows if not r["passed"]]
    summary = {
        "layouts_run": len(compared),
        "invalid_checked": len(invalid),
        "failures": len(fails),
        "steps": STEPS,
        "wall_s": round(wall, 1),
    }
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    lines = [
        f"# {title}",
        "",
        f"Command: `make test-matrix` (`python -m tests.matrix.run`). {summary['layouts_run']} "
        f"valid layouts trained {STEPS} steps each against the single process (losses rel 1e-5, "
        f"final weights within 1e-4 element-wise and rel 1e-4 per tensor), "
        f"{summary['invalid_checked']} invalid layouts checked for their one-line error; "
        f"**{summary['failures']} failures**; wall {summary['wall_s']} s on this machine.",
        "",
        "| layout | world | pass | max loss rel diff | max weight abs diff | seed | s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in valid:
        lines.append(
            f"| {r['layout']} | {r['world']} | {_status(r)} | "
            f"{r['loss_rel_diff']:.1e} | {r['weight_abs_diff']:.1e} | {r['seed']} | {r['seconds']} |"
        )
    lines += ["", "## Invalid layouts (each must fail before launch, naming the field)", ""]
    lines += ["| layout | world | pass | error |", "| --- | --- | --- | --- |"]
    for r in invalid:
        err = r["detail"].replace("|", "\\|")
        lines.append(
            f"| {r['layout']} | {r['world']} | {'pass' if r['passed'] else 'FAIL'} | {err} |"
        )
    if fails:
        lines += ["", "## Failures", ""] + [f"- {r['layout']}: {r['detail']}" for r in fails]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--subset", action="store_true", help="only the CI subset")
    ap.add_argument("--worlds", default="1-8", help="world sizes, e.g. 1-8 or 2,4")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/layout_matrix"))
    args = ap.parse_args(argv)
    if "-" in args.worlds:
        lo, hi = map(int, args.worlds.split("-"))
        worlds = range(lo, hi + 1)
    else:
        worlds = [int(w) for w in args.worlds.split(",")]
    layouts = [lay for lay in enumerate_layouts() if lay.world in worlds]
    if args.subset:
        layouts = pairwise_subset(layouts) + [lay for lay in layouts if expected_error(lay)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="matrix-") as tmp:
        base = base_overrides(str(Path(tmp) / "data"))
        cache: dict = {}
        invalid = [check_invalid(lay, base, tmp, cache) for lay in layouts if expected_error(lay)]
        valid = run_valid([lay for lay in layouts if expected_error(lay) is None], tmp)
    outcomes = valid + invalid
    title = "Layout matrix" + (" (CI subset)" if args.subset else "")
    write(outcomes, Path(args.out), title, time.perf_counter() - t0)
    fails = [o for o in outcomes if not o.passed]
    for o in fails:
        print(f"FAIL {o.layout.name}: {o.detail}", file=sys.stderr)
    print(f"{len(outcomes) - len(fails)}/{len(outcomes)} passed -> {args.out}.md")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
