"""Build the offload optimizer from the typed config (``offload.*`` and ``optim.*`` keys).

``validate_offload_args`` runs in ``plan_run`` (before any process group): it rejects unknown
kinds and an unusable NVMe folder with one line naming the field. ``build_offload_optimizer``
is what the trainer calls instead of ``torch.optim.AdamW`` when ``offload.kind != none``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

from offload.calibrate import calibrate, choose_list_kernel
from offload.optimizer import InterleavedOptimizer
from offload.plan import OffloadPlan, OffloadSettings, as_param_groups, params_device, plan_offload
from offload.tiers import OffloadConfigError, check_nvme_folder, padded

KINDS = ("none", "cpu", "nvme", "interleaved")
GradNorm = Callable[[list[torch.Tensor]], torch.Tensor]


def validate_offload_args(off: object) -> None:
    """Check ``offload.*`` before anything is built (the NVMe folder must be writable)."""
    if off.kind not in KINDS:
        raise OffloadConfigError(f"offload.kind={off.kind!r}: use one of {', '.join(KINDS)}")
    if off.kind == "none":
        return
    if off.subgroup_size < 1:
        raise OffloadConfigError(f"offload.subgroup_size={off.subgroup_size} must be >= 1")
    if off.kind == "nvme" and not off.nvme_path:
        raise OffloadConfigError(
            "offload.kind=nvme needs offload.nvme_path (a folder on a local NVMe/SSD)"
        )
    if off.nvme_path:
        check_nvme_folder(off.nvme_path, 0, "offload.nvme_path")


def plan_for(
    params: Iterable, settings: OffloadSettings, calibration: object | None = None
) -> OffloadPlan:
    """The plan, measuring first where a setting is ``auto``: the one place offload calibrates.

    Without ``calibration``, the machine is measured (``offload.calibrate.calibrate``, cached
    per machine in ``settings.calibration_cache``) when the placement or the CPU kernel is
    ``auto``; under ``cpu_kernel=auto`` the in-place list kernel is timed once the subgroups
    are known (``offload.calibrate.choose_list_kernel``).
    """
    groups = as_param_groups(params)
    if settings.needs_calibration() and calibration is None:
        calibration = calibrate(
            params_device(groups),
            settings.nvme_path or None,
            # whole O_DIRECT units: the NVMe figures move 12 * numel bytes at a time
            numel=padded(min(settings.subgroup_size, 1 << 22)),
            cache=settings.calibration_cache,
        )
    plan = plan_offload(groups, settings, calibration)
    if settings.cpu_kernel == "auto":
        plan.cpu_list_kernel = choose_list_kernel(plan)
    return plan


def interleaved_optimizer(
    params: Iterable, *, calibration: object | None = None, **kw
) -> InterleavedOptimizer:
    """``InterleavedOptimizer`` from keywords: ``OffloadSettings`` fields make the plan (see
    ``plan_for``), the rest (``lr``, ``betas``, ``eps``, ``weight_decay``, ``max_grad_norm``,
    ``grad_norm``) go to the optimizer.

    Example::

        opt = interleaved_optimizer(model.parameters(), lr=1e-3, placement="nvme",
                                    nvme_path="/nvme/run0")
    """
    names = {f.name for f in dataclasses.fields(OffloadSettings)}
    settings = OffloadSettings(**{k: v for k, v in kw.items() if k in names})
    plan = plan_for(params, settings, calibration)
    return InterleavedOptimizer(plan, **{k: v for k, v in kw.items() if k not in names})


def build_offload_optimizer(
    model: nn.Module, optim_args: object, offload_args: object, grad_norm: GradNorm
) -> InterleavedOptimizer:
    """AdamW (weight decay on matrices only, as the trainer's) with offloaded state.

    Args:
        model: the (possibly FSDP2-sharded) model; each rank offloads its local shards.
        optim_args: ``OptimArgs`` (lr, betas, eps, weight_decay, grad_clip).
        offload_args: ``OffloadArgs``.
        grad_norm: the global gradient norm over every shard and stage (the model family's,
            ``Family.grad_norm``: offload knows no parallel layout).
    """
    validate_offload_args(offload_args)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim_args.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    off = offload_args
    settings = OffloadSettings(
        placement=off.placement or {"cpu": "cpu", "nvme": "nvme", "interleaved": "auto"}[off.kind],
        subgroup_size=off.subgroup_size,
        nvme_path=off.nvme_path,
        host_budget_bytes=off.host_budget_mb << 20,
        device_budget_bytes=off.device_budget_mb << 20 if off.device_budget_mb >= 0 else -1,
        cpu_kernel=off.cpu_kernel,
        io_backend=off.io_backend,
        calibration_cache=off.calibration_cache,
    )
    return InterleavedOptimizer(
        plan_for(groups, settings),
        lr=optim_args.lr,
        betas=(optim_args.beta1, optim_args.beta2),
        eps=optim_args.eps,
        max_grad_norm=optim_args.grad_clip,
        grad_norm=grad_norm,
    )
