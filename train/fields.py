"""Fields that only act together with another setting: set while that setting is off, they
would be ignored, so ``plan_run`` refuses them before launch, naming both.

Each rule is ``field -> (condition on the job and layout, what the condition means)``. A field
at its schema default is never refused (experiments may carry defaults they do not use).
Together with each family's ``refuses`` and the typed per-family ``model.*`` schemas, this is
how a config field is either used or refused (``tests/unit/test_config_fields.py`` enumerates
every field x family and checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from checkpoint.format import names_checkpoint
from models.errors import ConfigError

Rule = tuple[Callable[[Any, Any], bool], str]


def _offload_on(job: Any, dims: Any) -> bool:
    return job.offload.kind != "none"


def _ckpt_on(job: Any, dims: Any) -> bool:
    return job.checkpoint.enabled


def _ckpt_or_resume(job: Any, dims: Any) -> bool:
    return job.checkpoint.enabled or names_checkpoint(job.checkpoint.resume)


def _data(*names: str) -> Callable[[Any, Any], bool]:
    return lambda job, dims: job.data.name in names


DEPENDS: dict[str, Rule] = {
    "offload.nvme_path": (_offload_on, "offload.kind != none"),
    "offload.host_budget_mb": (_offload_on, "offload.kind != none"),
    "offload.device_budget_mb": (
        lambda j, d: j.offload.kind == "interleaved",
        "offload=interleaved",
    ),
    "offload.subgroup_size": (_offload_on, "offload.kind != none"),
    "offload.placement": (_offload_on, "offload.kind != none"),
    "offload.cpu_kernel": (_offload_on, "offload.kind != none"),
    "offload.io_backend": (_offload_on, "offload.kind != none"),
    "offload.calibration_cache": (_offload_on, "offload.kind != none"),
    "checkpoint.every": (_ckpt_on, "checkpoint.enabled=true"),
    "checkpoint.keep_last": (_ckpt_on, "checkpoint.enabled=true"),
    "checkpoint.mode": (_ckpt_on, "checkpoint.enabled=true"),
    "checkpoint.host_buffer_mb": (_ckpt_on, "checkpoint.enabled=true"),
    "checkpoint.dir": (_ckpt_or_resume, "checkpoint.enabled=true or checkpoint.resume"),
    "checkpoint.allow_model_change": (
        _ckpt_or_resume,
        "checkpoint.enabled=true or checkpoint.resume",
    ),
    "logging.wandb_project": (lambda j, d: j.logging.wandb, "logging.wandb=true"),
    "data.prefetch": (lambda j, d: j.data.backend == "dali", "data.backend=dali"),
    "data.loader_threads": (lambda j, d: j.data.backend == "dali", "data.backend=dali"),
    "data.max_bytes": (_data("stdlib"), "data=stdlib"),
    "data.val_fraction": (_data("stdlib", "criteo"), "data=stdlib or data.name=criteo"),
    "data.path": (_data("stdlib", "shards", "criteo"), "data=stdlib, shards or criteo"),
    **{
        f"data.{k}": (_data("synthetic_clicks"), "data=synthetic_clicks")
        for k in ("num_sparse", "num_dense", "num_groups", "cardinality")
    },
    "parallel.pp_schedule": (lambda j, d: d.pp > 1, "parallel.pp > 1"),
    "parallel.pp_virtual": (lambda j, d: d.pp > 1, "parallel.pp > 1"),
    "parallel.pp_microbatches": (lambda j, d: d.pp > 1, "parallel.pp > 1"),
    "parallel.sequence_parallel_norms": (lambda j, d: d.tp > 1, "parallel.tp > 1"),
    "parallel.allow_cross_host_tp": (lambda j, d: d.tp > 1, "parallel.tp > 1"),
    "parallel.timeout_s": (lambda j, d: d.world_size > 1, "more than one rank"),
    "parallel.hang_timeout_s": (lambda j, d: d.world_size > 1, "more than one rank"),
}


def _get(obj: Any, key: str) -> Any:
    group, name = key.split(".", 1)
    return getattr(getattr(obj, group), name)


def refuse_ignored(job: Any, dims: Any, defaults: Any) -> None:
    """Raise ``ConfigError`` for the first field set away from its default in ``defaults``
    (a ``JobConfig()``) while the setting it acts with is off."""
    for key, (active, needs) in DEPENDS.items():
        value = _get(job, key)
        if value != _get(defaults, key) and not active(job, dims):
            raise ConfigError(
                f"{key}={value} has no effect without {needs}, so it would be ignored: "
                f"remove it or enable {needs.split(' ')[0]}"
            )
