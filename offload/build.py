"""Build the offload optimizer from the typed config (``offload.*`` and ``optim.*`` keys).

``validate_offload_args`` runs in ``plan_run`` (before any process group): it rejects unknown
kinds and an unusable NVMe folder with one line naming the field. ``build_offload_optimizer``
is what the trainer calls instead of ``torch.optim.AdamW`` when ``offload.kind != none``.
"""

from __future__ import annotations

import torch
from torch import nn

from offload.optimizer import InterleavedOptimizer
from offload.tiers import OffloadConfigError, check_nvme_folder

KINDS = ("none", "cpu", "nvme", "interleaved")


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


def build_offload_optimizer(
    model: nn.Module, optim_args: object, offload_args: object
) -> InterleavedOptimizer:
    """AdamW (weight decay on matrices only, as the trainer's) with offloaded state.

    Args:
        model: the (possibly FSDP2-sharded) model; each rank offloads its local shards.
        optim_args: ``OptimArgs`` (lr, betas, eps, weight_decay, grad_clip).
        offload_args: ``OffloadArgs``.
    """
    validate_offload_args(offload_args)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim_args.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    off = offload_args
    placement = off.placement or {"cpu": "cpu", "nvme": "nvme", "interleaved": "auto"}[off.kind]
    calibration = None
    if placement == "auto" or off.cpu_kernel == "auto":
        from offload.calibrate import calibrate

        device = next(iter(params)).device if params else torch.device("cpu")
        calibration = calibrate(
            device,
            off.nvme_path or None,
            numel=min(off.subgroup_size, 1 << 22),
            cache=off.calibration_cache,
        )
    return InterleavedOptimizer(
        groups,
        lr=optim_args.lr,
        betas=(optim_args.beta1, optim_args.beta2),
        eps=optim_args.eps,
        placement=placement,
        subgroup_size=off.subgroup_size,
        nvme_path=off.nvme_path,
        host_budget_bytes=off.host_budget_mb << 20,
        device_budget_bytes=off.device_budget_mb << 20 if off.device_budget_mb >= 0 else -1,
        max_grad_norm=optim_args.grad_clip,
        cpu_kernel=off.cpu_kernel,
        calibration=calibration,
        io_backend=off.io_backend,
    )
