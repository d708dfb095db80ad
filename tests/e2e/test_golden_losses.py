"""Golden loss trajectories (issue 15, point 6): the real entry point, run as stored in
``tests/golden/<case>.json``, logs the stored per-step losses and final validation metrics
(fp32 on CPU, rel 1e-5, atol 0). Unlike the equality tests, the reference does not move with the
code, so a change to math that both sides of an equality test share is caught. Regenerating is
legitimate only for an intended math change: docs/testing.md."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.golden.runner import CASES, ENV, compare, load_golden, run_case


def _param(name: str):
    multi = [pytest.mark.slow, pytest.mark.distributed] if CASES[name].nproc > 1 else []
    return pytest.param(name, marks=multi, id=name)


@pytest.mark.parametrize("name", [_param(n) for n in CASES])
def test_golden_losses(name: str, tmp_path: Path) -> None:
    compare(load_golden(name), run_case(CASES[name], tmp_path))


@pytest.mark.parametrize("name", list(CASES))
def test_golden_file_records_the_case(name: str) -> None:
    """The file holds the command it was made with: the case and its file cannot drift apart."""
    g = load_golden(name)
    case = CASES[name]
    assert (g["command"], g["overrides"], g["env"]) == (case.command, list(case.overrides), ENV)
    steps = dict(o.split("=", 1) for o in case.overrides)["train.steps"]
    assert len(g["losses"]) == int(steps)
    assert set(g["final"]) == set(case.final_keys) and g["why"] and g["generated_by"]


def _as_run(golden: dict) -> dict:
    got = copy.deepcopy({k: golden[k] for k in ("losses", "final", "corpus_sha256")})
    return {**got, "steps": list(range(1, len(got["losses"]) + 1))}


def test_compare_fails_on_a_perturbed_trajectory() -> None:
    """The check can fail: one loss moved by 2e-5 relative, a step missing, a NaN, a final
    metric or the corpus changed all fail, naming the step; rounding noise (1e-7) passes."""
    golden = load_golden("default")
    compare(golden, _as_run(golden))
    noisy = _as_run(golden)
    noisy["losses"] = [x * (1 + 1e-7) for x in noisy["losses"]]
    compare(golden, noisy)
    moved = _as_run(golden)
    moved["losses"][4] *= 1 + 2e-5
    with pytest.raises(AssertionError, match=r"max rel diff 2\.0\d*e-05.*first at step 5"):
        compare(golden, moved)
    nan = _as_run(golden)
    nan["losses"][-1] = float("nan")
    with pytest.raises(AssertionError, match="max rel diff inf"):
        compare(golden, nan)
    short = _as_run(golden)
    short["losses"], short["steps"] = short["losses"][:-1], short["steps"][:-1]
    with pytest.raises(AssertionError, match="logged steps"):
        compare(golden, short)
    final = _as_run(golden)
    final["final"]["val_loss"] *= 1 + 1e-4
    with pytest.raises(AssertionError, match="final val_loss"):
        compare(golden, final)
    corpus = _as_run(golden)
    corpus["corpus_sha256"] = "0" * 64
    with pytest.raises(AssertionError, match="corpus differs"):
        compare(golden, corpus)
