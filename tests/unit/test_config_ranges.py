"""Out-of-range optimizer, loop, logging and checkpoint values fail in ``plan_run`` (before any
process group) with one line naming the field and its range; the edges that mean "off" pass."""

from __future__ import annotations

import pytest

from models.errors import ConfigError
from train.cli import load_config
from train.ranges import check_ranges
from train.trainer import plan_run

# The cases of the unattended-runs issue, plus the neighbours with the same kind of rule.
BAD = [
    ("optim.lr=-1", "optim.lr=-1.0", "(0, inf)"),
    ("optim.lr=0", "optim.lr=0.0", "(0, inf)"),
    ("optim.beta1=1.5", "optim.beta1=1.5", "[0, 1)"),
    ("optim.beta2=1.0", "optim.beta2=1.0", "[0, 1)"),
    ("optim.beta1=-0.1", "optim.beta1=-0.1", "[0, 1)"),
    ("optim.eps=0", "optim.eps=0.0", "(0, inf)"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0", "[0, inf)"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio=2.0", "[0, 1]"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1", "[0, inf)"),
    ("parallel.timeout_s=0", "parallel.timeout_s=0.0", "(0, inf)"),
    ("logging.every=-5", "logging.every=-5", "[1, inf)"),
    ("logging.every=0", "logging.every=0", "[1, inf)"),
    ("train.warmup_steps=-3", "train.warmup_steps=-3", "[0, inf)"),
    ("train.eval_every=-1", "train.eval_every=-1", "[0, inf)"),
    ("train.eval_batches=0", "train.eval_batches=0", "[1, inf)"),
    ("train.max_time_s=-1", "train.max_time_s=-1.0", "[0, inf)"),
    ("optim.lr=nan", "optim.lr=nan", "(0, inf)"),
]


@pytest.mark.parametrize(("override", "named", "interval"), BAD)
def test_out_of_range_value_fails_in_plan_run(monkeypatch, override, named, interval) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    job, _ = load_config([override])
    with pytest.raises(ConfigError) as e:
        plan_run(job)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{named} is out of range"), msg
    assert interval in msg and f"set {override.split('=')[0]} to a value" in msg


def test_keep_last_below_zero_fails(monkeypatch) -> None:
    job, _ = load_config(["checkpoint.enabled=true", "checkpoint.keep_last=-1"])
    with pytest.raises(ConfigError, match=r"checkpoint.keep_last=-1 is out of range.*\[0, inf\)"):
        plan_run(job)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["optim.grad_clip=0", "train.warmup_steps=0", "train.eval_every=0", "optim.beta1=0"],
        ["checkpoint.enabled=true", "checkpoint.keep_last=0", "optim.min_lr_ratio=1"],
    ],
)
def test_edges_that_mean_off_are_accepted(overrides) -> None:
    job, _ = load_config(overrides)
    check_ranges(job)  # raises on any out-of-range field
