"""The interleaved offload optimizer: AdamW over flat subgroups whose state lives on the
accelerator, in host memory or on NVMe, updated on the accelerator or on the CPU.

Follows Deep Optimizer States (Maurya et al., "Towards Scalable Training of Transformer Models
Using Interleaved Offloading", 2024): subgroups are split between device and CPU updates by a
performance model (``offload.perf_model``) so transfers hide behind CPU updates; and
ZeRO-Infinity (Rajbhandari et al., 2021) for the NVMe tier: while subgroup *i* is updated,
subgroup *i+1* is read and subgroup *i-1* is written (three aligned staging buffers).

One step:

1. The global gradient norm over every parameter (DTensor shards and pipeline stages included:
   the ``grad_norm`` the builder injects, ``parallelism.utils.clip_grad_norm_`` with clipping
   off for a parallel model; offload does not import parallelism) decides, before any subgroup
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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from offload.aio import AsyncFileIO, Ticket, aligned_empty
from offload.kernels import AdamHyper, apply_multi, make_kernel, torch_fused
from offload.plan import N_SLOTS, OffloadPlan
from offload.tiers import (
    OffloadConfigError,
    Subgroup,
    aliasable,
    allocate_state,
    check_nvme_folder,
    gather_flat,
    local_tensor,
    reserve_file,
    scatter_flat,
)


def local_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of plain (one-process) gradients as a 0-d fp32 host tensor: the default
    ``grad_norm`` of ``InterleavedOptimizer``.

    Raises:
        ValueError: a gradient is a DTensor (sharded model): the norm must then cover every
            shard and stage, so pass a layout-aware ``grad_norm``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if any(hasattr(g, "to_local") for g in grads):
        raise ValueError(
            "InterleavedOptimizer: sharded (DTensor) gradients need a layout-aware grad_norm, "
            "e.g. lambda ps: parallelism.utils.clip_grad_norm_(ps, 0.0, pp_group)"
        )
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads).float().cpu()


class InterleavedOptimizer(torch.optim.Optimizer):
    """AdamW whose state is split into subgroups placed on device / host / NVMe.

    Executes an ``offload.plan.OffloadPlan`` (which subgroup lives and updates where, with
    which kernels); ``offload.build.interleaved_optimizer`` takes the plan's settings as
    keywords, measures when they say ``auto`` and builds both.

    Args:
        plan: from ``offload.plan.plan_offload`` (or ``offload.build.plan_for``); it holds the
            param groups, whose ``lr``, ``weight_decay``, ``betas``, ``eps`` override these.
        max_grad_norm: global gradient clipping (0 = off; the norm is still computed).
        grad_norm: ``params -> 0-d tensor``, the global gradient norm (every shard and pipeline
            stage); ``local_grad_norm`` (one process, plain tensors) when None.

    Example::

        plan = plan_offload(model.parameters(), OffloadSettings(placement="nvme",
                                                                nvme_path="/nvme/run0"))
        opt = InterleavedOptimizer(plan, lr=1e-3)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    owns_grad_clip = True
    """The trainer must not clip: this optimizer clips inside its update (see step)."""

    def __init__(
        self,
        plan: OffloadPlan,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        max_grad_norm: float = 0.0,
        grad_norm: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(plan.param_groups, defaults)
        self.plan = plan
        self.subgroups = plan.subgroups
        self.device = plan.device
        self.calibration = plan.calibration
        self.max_grad_norm = max_grad_norm
        self.grad_norm = grad_norm or local_grad_norm
        self.step_count = 0
        self.skipped_steps = 0
        self.last_grad_norm = torch.zeros(())
        self.cpu_kernel_name = plan.cpu_kernel
        self.cpu_kernel = make_kernel(plan.cpu_kernel)
        # Host-resident parameters are updated in place as lists of per-parameter views; the
        # plan may pick another kernel there (the list's shape matters too).
        self.cpu_list_kernel_name = plan.cpu_list_kernel
        self.cpu_list_kernel = (
            self.cpu_kernel
            if plan.cpu_list_kernel == plan.cpu_kernel
            else make_kernel(plan.cpu_list_kernel)
        )
        self._setup_storage(plan)
        # The state exists from here on (zero moments, master weights = the parameters), in the
        # subgroups rather than in ``self.state``. Say so in ``self.state`` too: DCP's
        # ``set_optimizer_state_dict`` otherwise "initialises" an empty-looking optimizer with a
        # zero-gradient step, which would copy these master weights over a model just loaded.
        for sg in self.subgroups:
            for p in sg.params:
                self.state[p] = {"placement": sg.placement}

    # -- set-up ---------------------------------------------------------------------------------
    def _setup_storage(self, plan: OffloadPlan) -> None:
        max_pad = plan.max_padded
        nvme_sgs = [sg for sg in self.subgroups if sg.placement == "nvme"]
        host_sgs = [sg for sg in self.subgroups if sg.placement in ("cpu", "nvme")]
        self.io: AsyncFileIO | None = None
        if nvme_sgs:
            if not plan.nvme_path:
                raise OffloadConfigError(
                    "offload.nvme_path is empty but subgroups are placed on nvme: set it to a "
                    "folder on a local NVMe/SSD"
                )
            rank = dist.get_rank() if dist.is_initialized() else 0
            folder = check_nvme_folder(
                Path(plan.nvme_path) / f"rank{rank:05d}",
                sum(sg.state_bytes for sg in nvme_sgs),
                "offload.nvme_path",
            )
            self.io = AsyncFileIO(folder, plan.io_backend, plan.io_threads)
        # Host buffers: one gradient buffer per slot for CPU updates, one state buffer per slot
        # for NVMe staging, one device state buffer pair for 'stage'.
        self._grad_slots = [aligned_empty(max_pad) for _ in range(N_SLOTS)] if host_sgs else []
        self._state_slots = [self.io.empty(3 * max_pad) for _ in range(N_SLOTS)] if nvme_sgs else []
        on_device = any(sg.placement in ("stage", "device") for sg in self.subgroups)
        self._dev_state = torch.empty(3 * max_pad, device=self.device) if on_device else None
        self._dev_grad = torch.empty(max_pad, device=self.device) if on_device else None
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
        """Make the parameters of an ``aliasable`` subgroup views of its master-weight row: the
        CPU update then writes the parameters directly, with no copy back."""
        if not aliasable(sg, self.device):
            return
        for p, off in zip(sg.params, sg.offsets):
            view = sg.state[0, off : off + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
            p._offload_row = True
        sg.extra["aliased"] = True

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
        total = self.grad_norm([p for sg in self.subgroups for p in sg.params])
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
        return self.plan.summary()

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
