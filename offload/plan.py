"""The offload plan: which subgroup lives and updates where, with which kernels and I/O backend.

``plan_offload`` turns the user's ``OffloadSettings`` and the machine's measured figures (an
``offload.calibrate.Calibration``, needed only for ``auto`` choices) into an ``OffloadPlan``;
``InterleavedOptimizer`` executes a plan and decides nothing itself. Planning measures nothing:
``offload.build.plan_for`` is the one place that measures (calibrates) before planning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from offload.perf_model import plan_placement
from offload.tiers import (
    PLACEMENTS,
    OffloadConfigError,
    Subgroup,
    aliasable,
    build_subgroups,
    local_tensor,
)

N_SLOTS = 3  # staging buffers: reading i+1, updating i, writing i-1


@dataclass
class OffloadSettings:
    """What the user asks for (the ``offload.*`` keys, in bytes).

    Attributes:
        placement: ``auto`` (performance model), one of ``device``, ``stage``, ``cpu``,
            ``nvme``, or a comma-separated list cycled over subgroups.
        subgroup_size: target elements per subgroup.
        nvme_path: folder of the NVMe tier (needed for ``nvme`` and for budget overflow).
        host_budget_bytes: host memory for optimizer state and staging (0 = unlimited).
        device_budget_bytes: device memory for resident state under ``auto`` (-1 = 40% of
            free accelerator memory; 0 on a CPU-only machine).
        cpu_kernel: ``auto`` (the calibration's fastest), ``torch_fused``, ``torch_foreach``,
            ``ds_cpu_adam``.
        io_backend: ``auto`` (the calibration's faster one, else ``offload.aio``'s default),
            ``threads``, ``deepspeed``.
        io_threads: I/O worker threads of the NVMe tier.
        calibration_cache: JSON file of cached measurements (empty: measure every time).
    """

    placement: str | list[str] = "cpu"
    subgroup_size: int = 1 << 22
    nvme_path: str = ""
    host_budget_bytes: int = 0
    device_budget_bytes: int = -1
    cpu_kernel: str = "torch_fused"
    io_backend: str = "auto"
    io_threads: int = 4
    calibration_cache: str = "~/.cache/lattice/offload_calibration.json"

    def needs_calibration(self) -> bool:
        """Whether a choice is ``auto``, so the plan needs measured figures."""
        return self.placement == "auto" or self.cpu_kernel == "auto"


@dataclass
class OffloadPlan:
    """Everything ``InterleavedOptimizer`` needs to lay out its state, decided up front.

    Attributes:
        param_groups: the param groups (dicts with ``params``) the subgroups index into.
        subgroups: subgroups with their ``placement`` set; no state allocated yet.
        device: where the parameters live (the accelerator, or the CPU).
        cpu_kernel: AdamW kernel of flat CPU updates (``offload.kernels.make_kernel`` name).
        cpu_list_kernel: kernel of in-place updates of aliased host parameters (lists).
        io_backend: the NVMe tier's ``offload.aio`` backend.
        io_threads: its worker threads.
        nvme_path: the NVMe folder ("" when none).
        calibration: the figures the plan was made from (None when nothing was ``auto``).
    """

    param_groups: list[dict]
    subgroups: list[Subgroup]
    device: torch.device
    cpu_kernel: str = "torch_fused"
    cpu_list_kernel: str = "torch_fused"
    io_backend: str = "auto"
    io_threads: int = 4
    nvme_path: str = ""
    calibration: object | None = field(default=None, repr=False)

    @property
    def max_padded(self) -> int:
        """The largest subgroup's padded size (the staging buffers' size)."""
        return max((sg.numel_padded for sg in self.subgroups), default=0)

    def summary(self) -> dict[str, int]:
        """Subgroups per placement, e.g. ``{'device': 2, 'cpu': 3, 'nvme': 1}``."""
        out: dict[str, int] = {}
        for sg in self.subgroups:
            out[sg.placement] = out.get(sg.placement, 0) + 1
        return out


def as_param_groups(params: Iterable) -> list[dict]:
    """``params`` (tensors or dicts, as ``torch.optim`` takes) as a list of group dicts."""
    items = list(params)
    if items and not isinstance(items[0], dict):
        items = [{"params": items}]
    return [{**g, "params": list(g["params"])} for g in items]


def plan_offload(
    params: Iterable, settings: OffloadSettings, calibration: object | None = None
) -> OffloadPlan:
    """Subgroups, their placement and the kernels, from the settings (and measured figures).

    Args:
        params: parameters or param groups.
        settings: the requested placement, sizes and budgets.
        calibration: measured figures; required when a setting is ``auto``.

    Raises:
        OffloadConfigError: a bad placement or subgroup size, or a host budget that cannot
            hold the state without an NVMe path.
    """
    s = settings
    if s.subgroup_size < 1:
        raise OffloadConfigError(f"offload.subgroup_size={s.subgroup_size} must be >= 1")
    if s.needs_calibration() and calibration is None:
        raise ValueError("placement/cpu_kernel 'auto' needs a calibration (offload.build.plan_for)")
    groups = as_param_groups(params)
    subgroups = build_subgroups(groups, s.subgroup_size)
    device = params_device(groups)
    if s.placement == "auto":
        placements = plan_placement(
            [sg.numel for sg in subgroups],
            calibration,
            device_budget(s.device_budget_bytes, device),
            s.host_budget_bytes,
            bool(s.nvme_path),
            same_resource=device.type == "cpu",
        )
    else:
        placements = expand_placement(s.placement, len(subgroups))
    for sg, pl in zip(subgroups, placements):
        sg.placement = pl
    max_pad = max((sg.numel_padded for sg in subgroups), default=0)
    slot_bytes = 4 * max_pad * 4  # state (3 rows) + gradient
    apply_host_budget(subgroups, s.host_budget_bytes, N_SLOTS * slot_bytes, bool(s.nvme_path))
    kernel = calibration.best_cpu_kernel() if s.cpu_kernel == "auto" else s.cpu_kernel
    io_backend = s.io_backend
    if io_backend == "auto" and getattr(calibration, "io_backend", "none") in (
        "threads",
        "deepspeed",
    ):
        io_backend = calibration.io_backend  # the faster one measured here
    return OffloadPlan(
        param_groups=groups,
        subgroups=subgroups,
        device=device,
        cpu_kernel=kernel,
        cpu_list_kernel=kernel,  # offload.build.plan_for times the lists under cpu_kernel=auto
        io_backend=io_backend,
        io_threads=s.io_threads,
        nvme_path=s.nvme_path,
        calibration=calibration,
    )


def params_device(groups: list[dict]) -> torch.device:
    """Where the (rank-local shards of the) parameters live; the CPU when there are none."""
    first = next((local_tensor(p) for g in groups for p in g["params"]), None)
    return first.device if first is not None else torch.device("cpu")


def aliased_subgroups(plan: OffloadPlan) -> list[Subgroup]:
    """The subgroups whose parameters will become views of their master-weight row (see
    ``offload.tiers.aliasable``; ask before an optimizer takes them): their update runs on
    lists of per-parameter views."""
    return [sg for sg in plan.subgroups if aliasable(sg, plan.device)]


def device_budget(device_budget_bytes: int, device: torch.device) -> int:
    """Bytes of device memory for resident state: as given, or 40% of what is free now."""
    if device_budget_bytes >= 0:
        return device_budget_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.4 * free)
    return 0


def expand_placement(placement: str | list[str], n: int) -> list[str]:
    """A placement name or comma-separated list, cycled over ``n`` subgroups."""
    items = placement.split(",") if isinstance(placement, str) else list(placement)
    items = [s.strip() for s in items if s.strip()]
    bad = [s for s in items if s not in PLACEMENTS]
    if not items or bad:
        raise OffloadConfigError(
            f"offload.placement={placement!r}: use one of {', '.join(PLACEMENTS)} or a "
            "comma-separated list of them (cycled over subgroups), or 'auto'"
        )
    return [items[i % len(items)] for i in range(n)]


def apply_host_budget(
    subgroups: list[Subgroup], host_budget_bytes: int, reserve_bytes: int, nvme: bool
) -> None:
    """Move host-resident subgroups (``cpu``/``stage``) beyond the budget to ``nvme``.

    Args:
        host_budget_bytes: bytes of host memory the optimizer may use (0 = unlimited).
        reserve_bytes: host bytes needed anyway (staging and gradient buffers).
        nvme: whether an NVMe path is configured.

    Raises:
        OffloadConfigError: the state does not fit and there is no NVMe path.
    """
    if host_budget_bytes <= 0:
        return
    used = reserve_bytes
    for sg in subgroups:
        if sg.placement not in ("cpu", "stage"):
            continue
        if used + sg.state_bytes <= host_budget_bytes:
            used += sg.state_bytes
            continue
        if not nvme:
            need = reserve_bytes + sum(
                s.state_bytes for s in subgroups if s.placement in ("cpu", "stage")
            )
            raise OffloadConfigError(
                f"offload.host_budget_mb={host_budget_bytes / 2**20:.0f} is smaller than the "
                f"host-resident optimizer state ({need / 2**20:.1f} MiB): raise it, or set "
                "offload.nvme_path so the rest spills to NVMe"
            )
        sg.placement = "nvme"
