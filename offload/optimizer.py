"""The interleaved offload optimizer: AdamW over flat subgroups whose state lives on the
accelerator, in host memory or on NVMe, updated on the accelerator or on the CPU.

Follows Deep Optimizer States (Maurya et al., "Towards Scalable Training of Transformer Models
Using Interleaved Offloading", 2024): subgroups are split between device and CPU updates by a
performance model (``offload.perf_model``) so transfers hide behind CPU updates; and
ZeRO-Infinity (Rajbhandari et al., 2021) for the NVMe tier: while subgroup *i* is updated,
subgroup *i+1* is read and subgroup *i-1* is written (three aligned staging buffers).

One step:

1. The global gradient norm over every parameter (DTensor shards and pipeline stages included,
   via ``parallelism.utils.clip_grad_norm_`` with clipping off) decides, before any subgroup
   changes: skip the whole step when it is not finite (nothing is updated, the step counter does
   not advance: the loss-scaler convention of DeepSpeed and Megatron), else the clip
   coefficient ``min(1, max_norm / (norm + 1e-6))`` applied to each subgroup's flat gradient.
2. Device subgroups are updated first (asynchronous on CUDA, so the GPU works while the CPU
   runs the host pipeline), then host subgroups in order: ``stage`` ones on the device through
   a side stream, ``cpu``/``nvme`` ones on the CPU with the fastest measured kernel
   (``offload.kernels``), NVMe reads/writes overlapped with the updates.
3. The updated fp32 master weights are copied into the (rank-local) parameters.

Written here because no library schedules per-subgroup CPU/accelerator placement; the math is
torch's fused AdamW kernel or DeepSpeed's CPUAdam, and NVMe I/O is DeepSpeed's async_io when
built (``offload.aio``). FSDP2 parameters are handled by operating on ``p.to_local()``: each rank
offloads only its own shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from offload.aio import AsyncFileIO, Ticket, aligned_empty
from offload.kernels import AdamHyper, apply_multi, make_kernel, rank_list_kernels, torch_fused
from offload.tiers import (
    PLACEMENTS,
    OffloadConfigError,
    Subgroup,
    allocate_state,
    build_subgroups,
    check_nvme_folder,
    gather_flat,
    local_tensor,
    reserve_file,
    scatter_flat,
)
from parallelism.utils import clip_grad_norm_

N_SLOTS = 3  # staging buffers: reading i+1, updating i, writing i-1


def _expand_placement(placement: str | list[str], n: int) -> list[str]:
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


class InterleavedOptimizer(torch.optim.Optimizer):
    """AdamW whose state is split into subgroups placed on device / host / NVMe.

    Args:
        params: parameters or param groups (``lr``, ``weight_decay``, ``betas``, ``eps``).
        placement: ``auto`` (performance model), one of ``device``, ``stage``, ``cpu``,
            ``nvme``, or a comma-separated list cycled over subgroups.
        subgroup_size: target elements per subgroup.
        nvme_path: folder of the NVMe tier (needed for ``nvme`` and for budget overflow).
        host_budget_bytes: host memory for optimizer state and staging (0 = unlimited).
        device_budget_bytes: device memory for resident state under ``auto`` (-1 = 40% of
            free accelerator memory; 0 on a CPU-only machine).
        max_grad_norm: global gradient clipping (0 = off; the norm is still computed).
        cpu_kernel: ``auto`` (the calibration's fastest), ``torch_fused``, ``torch_foreach``,
            ``ds_cpu_adam``.
        calibration: measured figures (``offload.calibrate.Calibration``); measured on demand
            when ``placement`` or ``cpu_kernel`` is ``auto`` and none is given.
        pp_group: pipeline group, so the norm covers every stage.

    Example::

        opt = InterleavedOptimizer(model.parameters(), lr=1e-3, placement="nvme",
                                   nvme_path="/nvme/run0")
        loss.backward(); opt.step(); opt.zero_grad()
    """

    owns_grad_clip = True
    """The trainer must not clip: this optimizer clips inside its update (see step)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        placement: str | list[str] = "cpu",
        subgroup_size: int = 1 << 22,
        nvme_path: str = "",
        host_budget_bytes: int = 0,
        device_budget_bytes: int = -1,
        max_grad_norm: float = 0.0,
        cpu_kernel: str = "torch_fused",
        calibration: object | None = None,
        io_backend: str = "auto",
        io_threads: int = 4,
        pp_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )
        if subgroup_size < 1:
            raise OffloadConfigError(f"offload.subgroup_size={subgroup_size} must be >= 1")
        self.max_grad_norm = max_grad_norm
        self.pp_group = pp_group
        self.step_count = 0
        self.skipped_steps = 0
        self.last_grad_norm = torch.zeros(())
        self.subgroups = build_subgroups(self.param_groups, subgroup_size)
        first = next((local_tensor(sg.params[0]) for sg in self.subgroups), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.calibration = calibration
        max_pad = max((sg.numel_padded for sg in self.subgroups), default=0)

        if placement == "auto" or cpu_kernel == "auto":
            self._ensure_calibration(nvme_path, subgroup_size)
        self.cpu_kernel_name = (
            self.calibration.best_cpu_kernel() if cpu_kernel == "auto" else cpu_kernel
        )
        self.cpu_kernel = make_kernel(self.cpu_kernel_name)
        # Host-resident parameters are updated in place as lists of per-parameter views; which
        # kernel is faster there depends on the list's shape too (chosen once the subgroups
        # are built, in ``_choose_list_kernel``).
        self.cpu_list_kernel = self.cpu_kernel
        self.cpu_list_kernel_name = self.cpu_kernel_name
        if placement == "auto":
            from offload.perf_model import plan_placement

            placements = plan_placement(
                [sg.numel for sg in self.subgroups],
                self.calibration,
                self._device_budget(device_budget_bytes),
                host_budget_bytes,
                bool(nvme_path),
                same_resource=self.device.type == "cpu",
            )
        else:
            placements = _expand_placement(placement, len(self.subgroups))
        for sg, pl in zip(self.subgroups, placements):
            sg.placement = pl
        slot_bytes = 4 * max_pad * 4  # state (3 rows) + gradient
        apply_host_budget(self.subgroups, host_budget_bytes, N_SLOTS * slot_bytes, bool(nvme_path))
        if io_backend == "auto" and getattr(self.calibration, "io_backend", "none") in (
            "threads",
            "deepspeed",
        ):
            io_backend = self.calibration.io_backend  # the faster one measured here
        self._setup_storage(nvme_path, io_backend, io_threads, max_pad)
        if cpu_kernel == "auto":
            self._choose_list_kernel()
        # The state exists from here on (zero moments, master weights = the parameters), in the
        # subgroups rather than in ``self.state``. Say so in ``self.state`` too: DCP's
        # ``set_optimizer_state_dict`` otherwise "initialises" an empty-looking optimizer with a
        # zero-gradient step, which would copy these master weights over a model just loaded.
        for sg in self.subgroups:
            for p in sg.params:
                self.state[p] = {"placement": sg.placement}

    # -- set-up ---------------------------------------------------------------------------------
    def _device_budget(self, device_budget_bytes: int) -> int:
        if device_budget_bytes >= 0:
            return device_budget_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(0.4 * free)
        return 0

    def _ensure_calibration(self, nvme_path: str, subgroup_size: int) -> None:
        if self.calibration is None:
            from offload.calibrate import calibrate

            self.calibration = calibrate(
                self.device, nvme_path or None, numel=min(subgroup_size, 1 << 22)
            )

    def _setup_storage(self, nvme_path: str, io_backend: str, io_threads: int, max_pad: int):
        nvme_sgs = [sg for sg in self.subgroups if sg.placement == "nvme"]
        host_sgs = [sg for sg in self.subgroups if sg.placement in ("cpu", "nvme")]
        self.io: AsyncFileIO | None = None
        if nvme_sgs:
            if not nvme_path:
                raise OffloadConfigError(
                    "offload.nvme_path is empty but subgroups are placed on nvme: set it to a "
                    "folder on a local NVMe/SSD"
                )
            rank = dist.get_rank() if dist.is_initialized() else 0
            folder = check_nvme_folder(
                Path(nvme_path) / f"rank{rank:05d}",
                sum(sg.state_bytes for sg in nvme_sgs),
                "offload.nvme_path",
            )
            self.io = AsyncFileIO(folder, io_backend, io_threads)
        # Host buffers: one gradient buffer per slot for CPU updates, one state buffer per slot
        # for NVMe staging, one device state buffer pair for 'stage'.
        self._grad_slots = [aligned_empty(max_pad) for _ in range(N_SLOTS)] if host_sgs else []
        self._state_slots = [self.io.empty(3 * max_pad) for _ in range(N_SLOTS)] if nvme_sgs else []
        staged = [sg for sg in self.subgroups if sg.placement == "stage"]
        self._dev_state = (
            torch.empty(3 * max_pad, device=self.device) if staged or self._has_device() else None
        )
        self._dev_grad = (
            torch.empty(max_pad, device=self.device) if staged or self._has_device() else None
        )
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        for sg in self.subgroups:
            if sg.placement == "nvme":
                sg.file = folder / f"subgroup_{sg.index:05d}.bin"
                reserve_file(sg.file, sg.state_bytes, "offload.nvme_path")
            else:
                sg.state = allocate_state(sg, self.device)
                self._alias_host_params(sg)
            self._reset_state(sg)

    def _alias_host_params(self, sg: Subgroup) -> None:
        """On a CPU-resident model, make plain fp32 parameters of a ``cpu`` subgroup views of
        its master-weight row (DeepSpeed's flat-buffer trick): the CPU update then writes the
        parameters directly, with no copy back. DTensor (FSDP2) parameters keep their storage
        (FSDP owns it) and are copied as usual."""
        if self.device.type != "cpu" or sg.placement != "cpu":
            return
        if any(
            hasattr(p, "to_local") or p.dtype != torch.float32 or hasattr(p, "_offload_row")
            for p in sg.params
        ):  # DTensor, low precision, or already owned by another optimizer's subgroup
            return
        for p, off in zip(sg.params, sg.offsets):
            view = sg.state[0, off : off + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
            p._offload_row = True
        sg.extra["aliased"] = True

    def _choose_list_kernel(self) -> None:
        """``cpu_kernel=auto`` on aliased subgroups: time torch's fused kernel against the
        calibration's pick on scratch lists shaped like the largest aliased subgroup (DeepSpeed
        pays a call per tensor, torch one per list, so many small tensors favour torch)."""
        aliased = [sg for sg in self.subgroups if sg.extra.get("aliased")]
        if not aliased or self.cpu_kernel_name == "torch_fused":
            return
        sg = max(aliased, key=lambda s: s.numel)
        sizes = [p.numel() for p in sg.params]
        speed = rank_list_kernels(
            {"torch_fused": torch_fused, self.cpu_kernel_name: self.cpu_kernel}, sizes
        )
        if speed["torch_fused"] > speed[self.cpu_kernel_name]:
            self.cpu_list_kernel, self.cpu_list_kernel_name = torch_fused, "torch_fused"

    def _has_device(self) -> bool:
        return any(sg.placement == "device" for sg in self.subgroups)

    def _reset_state(self, sg: Subgroup, moments: tuple | None = None) -> None:
        """Master := current parameters; moments := zeros or the given per-param tensors."""
        buf = sg.state if sg.state is not None else _rows(self._state_slots[0], sg)
        if sg.extra.get("aliased"):  # row 0 *is* the parameters
            buf[1:].zero_()
        else:
            buf.zero_()
            gather_flat([p.detach() for p in sg.locals()], sg, buf[0])
        if moments is not None:
            gather_flat(moments[0], sg, buf[1])
            gather_flat(moments[1], sg, buf[2])
        if sg.placement == "nvme":
            self.io.write(buf.contiguous(), sg.file).wait()

    # -- the step -------------------------------------------------------------------------------
    def _hyper(self, sg: Subgroup) -> AdamHyper:
        g = self.param_groups[sg.group]
        b1, b2 = g["betas"]
        return AdamHyper(g["lr"], b1, b2, g["eps"], g["weight_decay"], self.step_count)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One AdamW step over all subgroups (global norm, clip, skip decided first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for sg in self.subgroups for p in sg.params]
        total = clip_grad_norm_(params, 0.0, self.pp_group)
        self.last_grad_norm = total
        if not math.isfinite(total.item()):
            self.skipped_steps += 1
            return loss
        coef = None
        if self.max_grad_norm > 0:
            # The same fp32 expression as parallelism.utils.clip_grad_norm_, taken to a float
            # once (so every subgroup scales by the value the trainer's clip would use).
            coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0).item()
            if coef >= 1.0:
                coef = None
        self.step_count += 1
        for sg in self.subgroups:
            if sg.placement == "device":
                self._update_on_device(sg, sg.state, coef)
        self._host_pipeline([sg for sg in self.subgroups if sg.placement != "device"], coef)
        return loss

    def _grads(self, sg: Subgroup) -> list[torch.Tensor]:
        out = []
        for p in sg.params:
            if p.grad is None:
                raise RuntimeError(
                    "InterleavedOptimizer: a parameter with requires_grad has no gradient; "
                    "freeze it (requires_grad=False) before building the optimizer"
                )
            out.append(local_tensor(p.grad))
        return out

    def _update_on_device(self, sg: Subgroup, state: torch.Tensor, coef) -> None:
        n = sg.numel
        g = gather_flat(self._grads(sg), sg, self._dev_grad)
        if coef is not None:
            g.mul_(coef)
        torch_fused(state[0, :n], g, state[1, :n], state[2, :n], self._hyper(sg))
        scatter_flat(state[0], sg, sg.locals())

    def _update_staged(self, sg: Subgroup, coef) -> None:
        """Host state -> device buffer, device update, state back (side stream on CUDA)."""
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else _null()
        with ctx:
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
            dev = _rows(self._dev_state, sg)
            dev.copy_(sg.state, non_blocking=True)
            self._update_on_device(sg, dev, coef)
            sg.state.copy_(dev, non_blocking=True)

    def _update_on_cpu(self, sg: Subgroup, state: torch.Tensor, slot: int, coef) -> None:
        n = sg.numel
        grads = self._grads(sg)
        if sg.extra.get("aliased") and all(
            g.dtype == torch.float32 and g.is_contiguous() for g in grads
        ):
            # Host-resident model: update the parameters in place from their own gradients
            # (no gradient copy, no copy back). Clipping scales the gradients in place, as
            # torch.nn.utils.clip_grad_norm_ does.
            if coef is not None:
                torch._foreach_mul_(grads, coef)
            cached = sg.extra.get("row_views")
            if cached is None or cached[0] is not state:  # slicing costs ~8% of a 1M step
                cached = (
                    state,
                    [
                        [state[r, off : off + g.numel()] for g, off in zip(grads, sg.offsets)]
                        for r in range(3)
                    ],
                )
                sg.extra["row_views"] = cached
            views = cached[1]
            apply_multi(
                self.cpu_list_kernel,
                views[0],
                [g.view(-1) for g in grads],
                *views[1:],
                self._hyper(sg),
            )
            return
        g = gather_flat(grads, sg, self._grad_slots[slot])
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # d2h copies landed
        if coef is not None:
            g.mul_(coef)
        self.cpu_kernel(state[0, :n], g, state[1, :n], state[2, :n], self._hyper(sg))
        if not sg.extra.get("aliased"):
            scatter_flat(state[0], sg, sg.locals())

    def _host_pipeline(self, host: list[Subgroup], coef) -> None:
        """Update host subgroups in order; NVMe ones read one ahead and written one behind."""
        nvme = [sg for sg in host if sg.placement == "nvme"]
        slot_of = {sg.index: k % N_SLOTS for k, sg in enumerate(nvme)}
        reads: dict[int, Ticket] = {}
        writes: dict[int, Ticket] = {}  # slot -> pending write
        order = {sg.index: k for k, sg in enumerate(nvme)}

        def issue_read(k: int) -> None:
            if k >= len(nvme):
                return
            sg, slot = nvme[k], k % N_SLOTS
            if slot in writes:
                writes.pop(slot).wait()
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # h2d from this slot done
            buf = _rows(self._state_slots[slot], sg)
            reads[sg.index] = self.io.read(buf, sg.file)

        issue_read(0)
        cpu_slot = 0
        for sg in host:
            if sg.placement == "stage":
                self._update_staged(sg, coef)
            elif sg.placement == "cpu":
                self._update_on_cpu(sg, sg.state, cpu_slot, coef)
                cpu_slot = (cpu_slot + 1) % N_SLOTS
            else:
                k = order[sg.index]
                issue_read(k + 1)
                reads.pop(sg.index).wait()
                slot = slot_of[sg.index]
                buf = _rows(self._state_slots[slot], sg)
                self._update_on_cpu(sg, buf, slot, coef)
                writes[slot] = self.io.write(buf, sg.file)
        for t in writes.values():
            t.wait()
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    # -- state: torch.optim.AdamW's layout, wherever the state lives ----------------------------
    def _read_state(self, sg: Subgroup) -> torch.Tensor:
        """The subgroup's ``(3, N_pad)`` state as a host tensor (a fresh copy)."""
        if sg.placement == "nvme":
            buf = aligned_empty(3 * sg.numel_padded).view(3, sg.numel_padded)
            self.io.read(buf, sg.file).wait()
            return buf
        return sg.state.detach().to("cpu", copy=True)

    def placement_summary(self) -> dict[str, int]:
        """Subgroups per placement, e.g. ``{'device': 2, 'cpu': 3, 'nvme': 1}``."""
        out: dict[str, int] = {}
        for sg in self.subgroups:
            out[sg.placement] = out.get(sg.placement, 0) + 1
        return out

    def state_dict(self) -> dict:  # type: ignore[override]
        """``torch.optim.AdamW``-compatible state: per parameter ``step``, ``exp_avg``,
        ``exp_avg_sq`` shaped like the parameter (a DTensor with the parameter's placements when
        the parameter is one), read from whichever tier holds it."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state: dict[int, dict] = {}
        for sg in self.subgroups:
            buf = self._read_state(sg)
            for p, off in zip(sg.params, sg.offsets):
                loc = local_tensor(p)
                k = loc.numel()
                m, v = (buf[r, off : off + k].clone().view_as(loc) for r in (1, 2))
                state[index[id(p)]] = {
                    "step": torch.tensor(float(self.step_count)),
                    "exp_avg": _like_param(m.to(loc.device), p),
                    "exp_avg_sq": _like_param(v.to(loc.device), p),
                }
        groups = []
        for g in self.param_groups:
            groups.append(
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": [index[id(p)] for p in g["params"]],
                }
            )
        return {
            "state": state,
            "param_groups": groups,
            "offload": {"step": self.step_count, "skipped_steps": self.skipped_steps},
        }

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Restore from ``state_dict()`` (or a ``torch.optim.AdamW`` state dict of the same
        parameters); master weights are re-read from the current parameters."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)
        ):
            raise ValueError("optimizer state_dict does not match this optimizer's param groups")
        for mine, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k != "params":
                    mine[k] = v
        # The saved groups list each parameter's state key in order: ints from state_dict(),
        # FQNs from DCP's set_optimizer_state_dict; map by position, as torch.optim does.
        mine = [p for g in self.param_groups for p in g["params"]]
        index = dict(zip(map(id, mine), (k for g in groups for k in g["params"])))
        st = state_dict["state"]
        steps = {float(s["step"]) for s in st.values()} or {0.0}
        if len(steps) != 1:
            raise ValueError(f"per-parameter steps differ ({sorted(steps)[:4]}...)")
        extra = state_dict.get("offload", {})
        self.step_count = int(extra.get("step", steps.pop()))
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        for sg in self.subgroups:
            ms, vs = [], []
            for p in sg.params:
                s = st.get(index[id(p)])
                loc = local_tensor(p)
                if s is None:
                    ms.append(torch.zeros_like(loc))
                    vs.append(torch.zeros_like(loc))
                else:
                    ms.append(local_tensor(s["exp_avg"]))
                    vs.append(local_tensor(s["exp_avg_sq"]))
            self._reset_state(sg, (ms, vs))

    def close(self) -> None:
        """Stop I/O threads (files stay; they are scratch space, not checkpoints)."""
        if self.io is not None:
            self._state_slots = []  # buffers from io.empty() die with it
            self.io.close()


def _rows(flat: torch.Tensor, sg: Subgroup) -> torch.Tensor:
    """The first ``3 * N_pad`` elements of a flat buffer as a contiguous ``(3, N_pad)`` view."""
    return flat[: 3 * sg.numel_padded].view(3, sg.numel_padded)


def _like_param(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "to_local"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
    return t


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
