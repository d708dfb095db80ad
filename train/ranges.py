"""Numeric ranges of the generic config fields, checked by ``plan_run`` before any process group.

A value out of range (``optim.lr=-1``, ``optim.beta1=1.5``) would otherwise reach torch's
optimizer constructor on every rank after the process group exists and fail there as a
traceback, or (``optim.grad_clip=-1``, ``parallel.timeout_s=0``) be accepted and act strangely.
Each rule names the field, the value and the range, so the one-line error says what to set.
The model families check their own ``model.*`` fields (``Family.validate``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from models.errors import ConfigError

# field -> (lowest, lowest included, highest, highest included, what the field means)
RANGES: dict[str, tuple[float, bool, float, bool, str]] = {
    "optim.lr": (0.0, False, math.inf, False, "the peak learning rate"),
    "optim.min_lr_ratio": (0.0, True, 1.0, True, "the final fraction of optim.lr"),
    "optim.weight_decay": (0.0, True, math.inf, False, "decoupled weight decay"),
    "optim.beta1": (0.0, True, 1.0, False, "Adam's first-moment decay"),
    "optim.beta2": (0.0, True, 1.0, False, "Adam's second-moment decay"),
    "optim.eps": (0.0, False, math.inf, False, "Adam's epsilon"),
    "optim.grad_clip": (0.0, True, math.inf, False, "the gradient-norm clip (0 = off)"),
    "train.warmup_steps": (0, True, math.inf, False, "warm-up steps (0 = none)"),
    "train.eval_every": (0, True, math.inf, False, "steps between validations (0 = end only)"),
    "train.eval_batches": (1, True, math.inf, False, "validation batches"),
    "train.max_time_s": (0.0, True, math.inf, False, "the time limit (0 = none)"),
    "train.peak_tflops": (0.0, True, math.inf, False, "the peak TFLOP/s for MFU (0 = auto)"),
    "parallel.timeout_s": (0.0, False, math.inf, False, "the collective timeout in seconds"),
    "parallel.hang_timeout_s": (0.0, True, math.inf, False, "the hang watchdog (0 = off)"),
    "checkpoint.keep_last": (0, True, math.inf, False, "checkpoints kept (0 = all)"),
    "logging.every": (1, True, math.inf, False, "steps between metrics lines"),
}


def _interval(lo: float, lo_in: bool, hi: float, hi_in: bool) -> str:
    return f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _inside(v: float, lo: float, lo_in: bool, hi: float, hi_in: bool) -> bool:
    above = v >= lo if lo_in else v > lo
    below = v <= hi if hi_in else v < hi
    return above and below and not math.isnan(v)


def check_ranges(job: Any) -> None:
    """Raise ``ConfigError`` naming the first field of ``RANGES`` whose value is out of range,
    or an entry of ``checkpoint.allow_model_change`` that is no ``model.*`` field."""
    _check_model_change_names(job)
    for key, (lo, lo_in, hi, hi_in, what) in RANGES.items():
        group, name = key.split(".", 1)
        value = getattr(getattr(job, group), name)
        if not _inside(float(value), lo, lo_in, hi, hi_in):
            raise ConfigError(
                f"{key}={value} is out of range: {what} must be in "
                f"{_interval(lo, lo_in, hi, hi_in)}; set {key} to a value in that range"
            )
    _check_hang_below_timeout(job.parallel)


def _check_hang_below_timeout(p: Any) -> None:
    """The watchdog must fire before the collective timeout, or it never does."""
    if p.hang_timeout_s and p.hang_timeout_s >= p.timeout_s:
        raise ConfigError(
            f"parallel.hang_timeout_s={p.hang_timeout_s:g} must be below parallel.timeout_s="
            f"{p.timeout_s:g} (the collective timeout would fire first): lower it, or set 0 to "
            f"turn the watchdog off"
        )


def _check_model_change_names(job: Any) -> None:
    """A misspelt ``checkpoint.allow_model_change`` entry would allow nothing and then refuse
    the resume it was meant to permit; name it now, with the model's fields."""
    known = {f.name for f in dataclasses.fields(job.model)}
    for entry in job.checkpoint.allow_model_change:
        name = str(entry).removeprefix("model.")
        if name not in known:
            raise ConfigError(
                f"checkpoint.allow_model_change names {entry!r}, which is no model.* field; "
                f"use names from: {', '.join(sorted(known))}"
            )
