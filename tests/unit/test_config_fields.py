"""Every config field x every model family is either used or refused before launch (issue 15,
Must show 2): nothing a user sets is ignored silently.

For each family, one tiny run (plan, build, train 2 steps with checkpoints and validation, close)
records which fields the code reads, with the refusal checks themselves not counted. A field
read there is used. Every other field is set to a non-default value: ``plan_run`` must then
refuse it with a message naming it, or, if it is accepted, a run with it must read it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from models.errors import LatticeUserError
from tests.trainer_utils import TINY
from train.cli import load_config
from train.config import JobConfig
from train.families import FAMILIES

FAST = ["train.steps=2", "train.eval_every=1", "checkpoint.enabled=true", "checkpoint.every=1"]
LOOP = [o for o in TINY if o.startswith(("train.", "logging.")) and "seq_len" not in o]
BASE = {
    "gpt": [*TINY, *FAST],
    "gpt_moe": ["model=gpt_moe", *TINY, "model.n_experts=4", *FAST],
    "dlrm": ["experiment=dlrm_synthetic", *LOOP, *FAST],
    "dmt": ["experiment=dmt_synthetic", *LOOP, *FAST],
}
BASE["dmt"].append("model.partition_warmup_steps=2")
# Non-default values for string fields (numbers and booleans are derived from the default).
STRINGS = {
    "run.name": "other",
    "train.dtype": "bf16",
    "optim.name": "sgd",
    "optim.impl": "foreach",
    "parallel.pp_schedule": "gpipe",
    "parallel.backend": "gloo",
    "data.name": "shards",
    "data.path": "/nonexistent/lattice-data",
    "data.backend": "dali",
    "data.dali_device": "gpu",
    "checkpoint.mode": "sync",
    "checkpoint.resume": "latest",
    "checkpoint.dir": "/nonexistent/lattice-ckpt",
    "offload.kind": "cpu",
    "offload.nvme_path": "/tmp",
    "offload.placement": "cpu",
    "offload.cpu_kernel": "torch_fused",
    "offload.io_backend": "threads",
    "offload.calibration_cache": "",
    "logging.wandb_project": "other",
    "model.name": "dlrm",
    "model.router": "softmax",
    "model.tower_plan": "round_robin",
}


def other_value(key: str, default: Any) -> str:
    if key in STRINGS:
        return STRINGS[key]
    if isinstance(default, bool):
        return str(not default).lower()
    if isinstance(default, int):
        return str(default + 1 if default >= 1 else 2)
    if isinstance(default, float):
        return str(default * 2 if default else 0.5)
    if isinstance(default, list):
        return "[8]"
    raise AssertionError(f"no test value for {key} (default {default!r}): add it to STRINGS")


def all_fields(family: str) -> dict[str, Any]:
    """``group.field`` -> schema default, with ``model.*`` from the family's own schema."""
    out = {}
    root = JobConfig()
    for group in dataclasses.fields(JobConfig):
        obj = FAMILIES[family].args() if group.name == "model" else getattr(root, group.name)
        for f in dataclasses.fields(obj):
            out[f"{group.name}.{f.name}"] = getattr(obj, f.name)
    return out


class Reads:
    """Records ``job.<group>.<field>`` reads while ``on``."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.on = True

    def track(self, job: JobConfig) -> None:
        for group in dataclasses.fields(JobConfig):
            obj = getattr(job, group.name)
            obj.__class__ = self._tracked(type(obj), group.name)

    def _tracked(self, cls: type, group: str) -> type:
        reads, names = self, set(cls.__dataclass_fields__)

        def getattribute(obj: Any, name: str) -> Any:
            if reads.on and name in names:
                reads.seen.add(f"{group}.{name}")
            return object.__getattribute__(obj, name)

        return type(cls.__name__, (cls,), {"__getattribute__": getattribute})


def _paused(reads: Reads, fn: Any) -> Any:
    def run(*args: Any, **kw: Any) -> Any:
        reads.on = False
        try:
            return fn(*args, **kw)
        finally:
            reads.on = True

    return run


def tracked_run(overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Plan, build, train, close; the fields read (refusal checks not counted)."""
    import train.trainer as trainer_mod

    reads = Reads()
    for name in ("refuse_unsupported", "refuse_ignored"):
        monkeypatch.setattr(trainer_mod, name, _paused(reads, getattr(trainer_mod, name)))
    job, cfg = load_config(overrides)
    reads.track(job)
    trainer = trainer_mod.Trainer(job, cfg, trainer_mod.plan_run(job))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return reads.seen


def refused(overrides: list[str], key: str) -> str | None:
    """The one-line error naming ``key`` that planning gives, or None if it is accepted."""
    from train.trainer import plan_run

    try:
        job, _ = load_config(overrides)
        plan_run(job)
    except LatticeUserError as e:
        assert key in str(e), f"{key}: the error does not name the field: {e}"
        return str(e)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_field_is_used_or_refused(family: str, tmp_path: Path, monkeypatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)  # data caches and nvme files stay in the test's folder
    base = [*BASE[family], f"run.dir={tmp_path / 'run'}"]
    used = tracked_run(base, monkeypatch)
    ignored = []
    for key, default in all_fields(family).items():
        if key in used:
            continue
        override = f"{key}={other_value(key, default)}"
        if refused([*base, override], key) is not None:
            continue
        run_dir = tmp_path / key.replace(".", "_")
        if key not in tracked_run([*base, override, f"run.dir={run_dir}"], monkeypatch):
            ignored.append(override)
    assert not ignored, f"model.name={family}: accepted but never read: {ignored}"


def test_checker_catches_an_ignored_field(tmp_path: Path, monkeypatch) -> None:
    """The read tracker sees a read and misses an unread field (the test above can fail)."""
    reads = Reads()
    job, _ = load_config(TINY)
    reads.track(job)
    _ = job.train.steps
    assert "train.steps" in reads.seen and "train.seed" not in reads.seen
    reads.on = False
    _ = job.train.seed
    assert "train.seed" not in reads.seen
