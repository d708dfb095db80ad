"""AdamW kernels on flat fp32 subgroups: torch's fused kernel, its foreach form, DeepSpeed's
CPUAdam (AVX + OpenMP, ZeRO-Offload's kernel), and how to pick the fastest by measuring.

Owns the update math of one subgroup. Every kernel computes torch.optim.AdamW's update
(decoupled weight decay, bias correction):

    p <- p * (1 - lr*wd);  m <- b1*m + (1-b1)*g;  v <- b2*v + (1-b2)*g^2
    p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)

Nothing here is written by hand: the kernels are ``torch._fused_adamw_`` (the kernel behind
``AdamW(fused=True)``), ``torch._foreach_*`` and DeepSpeed's ``cpu_adam`` op. This module only
adapts them to one call signature and times them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

KernelFn = Callable[..., None]


@dataclass
class AdamHyper:
    """Hyper-parameters of one update (lr is read from the param group every step)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int


def _fused_lists(ps: list, gs: list, ms: list, vs: list, h: AdamHyper) -> None:
    """One ``torch._fused_adamw_`` call over lists of tensors (the step shared by all)."""
    step = torch.tensor(float(h.step), device=ps[0].device)
    torch._fused_adamw_(
        ps,
        gs,
        ms,
        vs,
        [],
        [step] * len(ps),
        lr=h.lr,
        beta1=h.beta1,
        beta2=h.beta2,
        weight_decay=h.weight_decay,
        eps=h.eps,
        amsgrad=False,
        maximize=False,
    )


def torch_fused(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, h: AdamHyper):
    """``torch._fused_adamw_`` on one flat tensor (any device torch has a fused AdamW for).

    Args:
        p, g, m, v: parameters, gradients, exp_avg, exp_avg_sq; each shape ``(N,)``, fp32.
    """
    _fused_lists([p], [g], [m], [v], h)


def apply_multi(
    kernel: KernelFn,
    ps: list[torch.Tensor],
    gs: list[torch.Tensor],
    ms: list[torch.Tensor],
    vs: list[torch.Tensor],
    h: AdamHyper,
) -> None:
    """Apply ``kernel`` to lists of flat tensors (one call for torch's multi-tensor kernels).

    Args:
        ps, gs, ms, vs: per-parameter flat fp32 tensors, ``ps[i].shape == gs[i].shape == (n_i,)``.
    """
    if kernel is torch_fused:
        _fused_lists(ps, gs, ms, vs, h)
        return
    for p, g, m, v in zip(ps, gs, ms, vs):
        kernel(p, g, m, v, h)


def torch_foreach(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, h: AdamHyper):
    """The same update through ``torch.optim.adamw``'s foreach implementation (any device)."""
    from torch.optim.adamw import adamw

    adamw(
        [p],
        [g],
        [m],
        [v],
        [],
        [torch.tensor(float(h.step - 1))],
        foreach=True,
        amsgrad=False,
        beta1=h.beta1,
        beta2=h.beta2,
        lr=h.lr,
        weight_decay=h.weight_decay,
        eps=h.eps,
        maximize=False,
    )


class DeepSpeedCPUAdamKernel:
    """DeepSpeed's ``cpu_adam`` op (JIT-built on first use; cached in ~/.cache/torch_extensions).

    Raises:
        RuntimeError: deepspeed is not installed or the op does not build (message says why).
    """

    _op = None
    _next_id = 1_000

    def __init__(self) -> None:
        if DeepSpeedCPUAdamKernel._op is None:
            try:
                from deepspeed.ops.op_builder import CPUAdamBuilder

                DeepSpeedCPUAdamKernel._op = CPUAdamBuilder().load(verbose=False)
            except Exception as exc:  # ImportError or a compiler error
                raise RuntimeError(f"DeepSpeed cpu_adam unavailable: {exc!r}"[:500]) from exc
        self.op = DeepSpeedCPUAdamKernel._op
        self.opt_id = DeepSpeedCPUAdamKernel._next_id
        DeepSpeedCPUAdamKernel._next_id += 1
        self.op.create_adam(self.opt_id, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False)

    def __call__(self, p, g, m, v, h: AdamHyper) -> None:
        self.op.adam_update(
            self.opt_id, h.step, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, True, p, g, m, v
        )

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.op.destroy_adam(self.opt_id)


def make_kernel(name: str) -> KernelFn:
    """Kernel by name: ``torch_fused``, ``torch_foreach`` or ``ds_cpu_adam``."""
    if name == "torch_fused":
        return torch_fused
    if name == "torch_foreach":
        return torch_foreach
    if name == "ds_cpu_adam":
        return DeepSpeedCPUAdamKernel()
    raise ValueError(
        f"offload.cpu_kernel={name!r}: use auto, torch_fused, torch_foreach, ds_cpu_adam"
    )


def deepspeed_op_ready(name: str) -> bool:
    """True when DeepSpeed op ``name`` loads without compiling: installed pre-built
    (``DS_BUILD_OPS=1``) or already JIT-built into torch's extension cache. ``auto`` choices only
    use such ops, so a training run never stalls for minutes in a C++ build."""
    if not deepspeed_installed():
        return False
    try:
        import torch.utils.cpp_extension as ext
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get(name):
            return True
        folder = ext._get_build_directory(name, False)
        return os.path.exists(os.path.join(folder, f"{name}.so"))
    except Exception:
        return False


def deepspeed_installed() -> bool:
    """True when the deepspeed package can be imported (its ops may still fail to build)."""
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def time_kernel(kernel: KernelFn, numel: int, device: str = "cpu", repeats: int = 5) -> float:
    """Median seconds of one update of ``numel`` fp32 parameters (after one warm-up call)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(numel, generator=gen).to(device)
    g = torch.randn(numel, generator=gen).to(device)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    h = AdamHyper(1e-3, 0.9, 0.95, 1e-8, 0.1, 1)
    kernel(p, g, m, v, h)
    times = []
    for i in range(repeats):
        h.step = i + 2
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        kernel(p, g, m, v, h)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def rank_kernels(names: list[str], numel: int, repeats: int = 9) -> dict[str, float]:
    """Params/s of each named CPU kernel on ``numel`` fp32 parameters.

    The kernels' calls are interleaved round-robin (so load from other processes hits them
    alike) and the median per kernel is kept; a kernel that cannot be made is left out.
    """
    kernels = {}
    for name in names:
        try:
            kernels[name] = make_kernel(name)
        except RuntimeError:
            continue
    return rank_list_kernels(kernels, [numel], repeats)


def rank_list_kernels(
    kernels: dict[str, KernelFn], sizes: list[int], repeats: int = 7
) -> dict[str, float]:
    """Params/s of each kernel applied (through :func:`apply_multi`) to a list of tensors of
    the given sizes, on scratch tensors.

    A host-resident model is updated as a list of per-parameter views, so the choice depends on
    the list's shape as well as on the kernel: DeepSpeed's op takes one call per tensor, torch's
    fused kernel one call for the whole list. Measured here: 1M parameters in 4 tensors,
    DeepSpeed 0.97 and torch fused 0.90 of the best peer. Rounds alternate the order; medians.
    """
    gen = torch.Generator().manual_seed(0)
    lists = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(2)]
    ps, gs = lists
    ms = [torch.zeros(n) for n in sizes]
    vs = [torch.zeros(n) for n in sizes]
    h = AdamHyper(1e-3, 0.9, 0.95, 1e-8, 0.1, 1)
    times: dict[str, list[float]] = {k: [] for k in kernels}
    for r in range(repeats + 1):
        order = list(kernels) if r % 2 == 0 else list(reversed(kernels))
        for name in order:
            h.step = r + 1
            t0 = time.perf_counter()
            apply_multi(kernels[name], ps, gs, ms, vs, h)
            if r:  # the first round is a warm-up
                times[name].append(time.perf_counter() - t0)
    total = sum(sizes)
    return {k: total / sorted(t)[len(t) // 2] for k, t in times.items()}
