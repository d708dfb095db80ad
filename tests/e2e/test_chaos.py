"""The suite's short chaos run (``benchmarks/chaos.py``): SIGKILLs of random workers under
``torchrun --max-restarts=10`` lose at most ``checkpoint.every`` steps each, the run completes,
and its final weights and optimizer state equal an uninterrupted run's bit for bit."""

from __future__ import annotations

import pytest

from benchmarks.chaos import run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_killed_workers_restart_and_the_result_is_bit_identical(tmp_path):
    r = run(tmp_path, nproc=4, steps=12, every=2, kills=2, seed=1)
    assert r["kills"] == 2
    assert r["completed_steps"] == 12
    assert r["bit_identical"], r["differing_tensors"]
    assert r["max_steps_redone"] <= 2, r["failures"]
    assert all(f["resumed_from"] % 2 == 0 for f in r["failures"])  # a committed checkpoint
