"""Every layout equals one process (issue 19): the CI subset of the layout matrix
(``tests.matrix``), the invalid layouts' errors, and ep borrowing from dp_replicate.

The whole matrix runs with ``make test-matrix`` and writes ``benchmarks/results/layout_matrix.md``.
The subset here covers every pair of features (a non-trivial degree, a pipeline schedule,
sequence-parallel norms, the family) at least once, plus every assignment of degrees with 4 or
more non-trivial dimensions at world 8, the pipeline schedule rotating among them
(``pairwise_subset``); the full matrix runs every schedule under each one."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.matrix.layouts import (
    Layout,
    degrees,
    enumerate_layouts,
    expected_error,
    pairwise_subset,
)
from tests.matrix.runner import base_overrides, check_invalid, run_valid


def _failures(outcomes: list) -> list:
    return [(o.layout.name, o.detail) for o in outcomes if not o.passed]


def test_invalid_layouts_fail_before_launch_naming_the_field(tmp_path: Path) -> None:
    base = base_overrides(str(tmp_path / "data"))
    bad = [lay for lay in enumerate_layouts() if expected_error(lay)]
    assert len(bad) > 200
    cache: dict = {}
    outcomes = [check_invalid(lay, base, str(tmp_path), cache) for lay in bad]
    assert not _failures(outcomes), _failures(outcomes)[:5]


def test_subset_covers_every_pair_and_every_4d_layout_at_world_8() -> None:
    layouts = enumerate_layouts()
    valid = [lay for lay in layouts if expected_error(lay) is None]
    subset = pairwise_subset(layouts)
    pairs = lambda ls: {frozenset(p) for x in ls for p in itertools.combinations(x.features(), 2)}  # noqa: E731
    assert pairs(valid) == pairs(subset)
    four_dim = [x for x in valid if x.world == 8 and x.n_dims >= 4]
    assert {degrees(x) for x in four_dim} <= {degrees(x) for x in subset}
    assert {x.schedule for x in four_dim if x.pp > 1} == {x.schedule for x in subset if x.pp > 1}
    assert len(valid) > 350 and len(subset) < 30


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1800)  # 22 layouts, 20 of them on 8 ranks: 20-45 s each on 2 cores
def test_ci_subset_equals_single_process(tmp_path: Path) -> None:
    outcomes = run_valid(pairwise_subset(enumerate_layouts()), str(tmp_path))
    assert not _failures(outcomes), _failures(outcomes)
    assert all(o.loss_rel_diff <= 1e-5 for o in outcomes)


@pytest.mark.distributed
def test_ep4_on_dp_replicate2_x_dp_shard2_equals_single_process(tmp_path: Path) -> None:
    """Must-show 4: expert parallelism borrows the replicate dimension (megatron-core's layout;
    the rank groups are compared with its RankGenerator in tests/unit/test_dims.py)."""
    lay = Layout("gpt_moe", dp_shard=2, dp_replicate=2, ep=4)
    assert expected_error(lay) is None
    outcomes = run_valid([lay], str(tmp_path))
    assert not _failures(outcomes), _failures(outcomes)


def test_compare_fails_on_a_perturbed_layout() -> None:
    """The matrix's check can fail: a loss off by 2e-5, a weight off by one AdamW step, a
    missing tensor and a rank's error each fail the layout."""
    import numpy as np

    from tests.matrix.runner import compare

    lay = Layout("gpt", dp_shard=2)
    w = {"a.weight": np.ones((4, 3), dtype=np.float32)}
    ref = {"losses": [3.0, 2.5, 2.0], "val": 2.2, "weights": w}
    good = {"losses": [3.0, 2.5, 2.0], "val": 2.2, "weights": dict(w)}
    assert compare(lay, 1.0, [good, {**good, "weights": {}}], ref).passed
    moved = {**good, "losses": [3.0, 2.5, 2.0 * (1 + 2e-5)]}
    assert not compare(lay, 1.0, [moved], ref).passed
    stepped = {**good, "weights": {"a.weight": w["a.weight"] + np.float32(1e-2)}}
    assert not compare(lay, 1.0, [stepped], ref).passed
    assert not compare(lay, 1.0, [{**good, "weights": {}}], ref).passed
    assert not compare(lay, 1.0, [good, "Traceback ...\nRuntimeError: boom"], ref).passed
