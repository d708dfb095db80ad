"""Bad input fails fast with one line naming the field and the fix, before any process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    # No MASTER_ADDR/PORT: creating a process group would fail loudly, so a clean exit 2 proves
    # the check ran first.
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )


# Each case: the overrides, the torchrun-like environment, the field(s) the line must name, and
# the fix it must give (what to set, or what to run).
@pytest.mark.parametrize(
    "args,env,fields,fix",
    [
        (
            ["parallel.tp=3", "parallel.dp_shard=1"],
            {"WORLD_SIZE": "4", "RANK": "0"},
            ["world size 4", "parallel.tp"],
            ["change parallel.tp/pp/sp or the number of processes"],
        ),
        (
            ["parallel.dp_shard=2", "parallel.dp_replicate=3"],
            {"WORLD_SIZE": "4", "RANK": "0"},
            ["parallel.dp_replicate=3", "world size 4"],
            ["change the degrees", "set one of dp_shard/dp_replicate to -1"],
        ),
        (
            ["train.global_batch_size=10", "train.micro_batch_size=4"],
            None,
            ["train.global_batch_size=10", "train.micro_batch_size"],
            ["use a multiple of 4 or change train.micro_batch_size"],
        ),
        (
            ["train.global_batch_size=8", "train.micro_batch_size=2", "parallel.dp_shard=8"],
            {"WORLD_SIZE": "8", "RANK": "0"},
            ["train.global_batch_size=8", "2 x 8"],
            ["use a multiple of 16 or change train.micro_batch_size"],
        ),
        (
            ["train.stepz=5"],
            None,
            ["train.stepz"],
            ["is not a config key", "`python -m train --cfg job`"],
        ),
        (
            ["data=shards", "data.path=/nonexistent/shards"],
            None,
            ["data.path='/nonexistent/shards'"],
            ["`python -m train.prepare --out DIR", "point data.path at DIR"],
        ),
        (
            ["model.n_heads=3"],
            None,
            ["model.n_heads=3", "model.dim=128"],
            ["set model.n_heads to a divisor of 128 (e.g. 2) or change model.dim"],
        ),
        (
            ["model.n_heads=4", "model.n_kv_heads=3"],
            None,
            ["model.n_kv_heads=3"],
            ["set model.n_kv_heads to a divisor of 4 (e.g. 2)"],
        ),
    ],
    ids=[
        "degrees",
        "dp-product",
        "batch",
        "batch-dp",
        "unknown-key",
        "data-path",
        "heads",
        "kv-heads",
    ],
)
def test_bad_input_one_line(args, env, fields, fix) -> None:
    proc = _run(args, env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert "error:" in line, line
    for n in fields:
        assert n in line, ("field not named", n, line)
    for n in fix:
        assert n in line, ("fix not given", n, line)


def test_cfg_job_prints_resolved_config() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "train", "train.steps=7", "--cfg", "job"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "steps: 7" in proc.stdout and "dir: runs/default" in proc.stdout
