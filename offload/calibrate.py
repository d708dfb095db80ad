"""Start-up calibration: measure what the performance model needs, cache it per machine, print it.

Measured (each a median of a few repeats):

* host<->device copy bandwidth (pinned host buffers; on a CPU-only machine a host memcpy);
* AdamW kernel throughput of every available CPU kernel (torch fused, torch foreach, DeepSpeed
  CPUAdam when it loads without a build), the fastest is the CPU path's kernel;
* seconds per parameter of the real device-update and CPU-update code paths of
  ``InterleavedOptimizer`` (gradient copy-out, kernel, parameter copy-in, norm included);
* NVMe read and write bandwidth through ``offload.aio`` on subgroup-sized buffers, for each
  backend (thread pool, DeepSpeed async_io when built); the faster one is the tier's backend
  under ``io_backend=auto`` (on some virtual disks libaio is slower than parallel ``preadv``);
* under contention: the CPU update while the disk reads/writes, and the disk while the CPU
  updates (both happen at once in the NVMe pipeline);
* the disk's duplex factor: a read and a write in flight together (as the pipeline keeps
  them) against the same transfers one after the other. 1 = the two share one queue (the
  development machine's virtual disk measures 0.9-1.07), 2 = they do not slow each other.

The figures are cached in a JSON file keyed by host, device, NVMe folder, torch version and
subgroup size (ZeRO-Infinity and Deep Optimizer States calibrate the same way at start-up).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from offload.aio import AsyncFileIO, aligned_empty
from offload.kernels import (
    AdamHyper,
    deepspeed_op_ready,
    make_kernel,
    rank_kernels,
    rank_list_kernels,
    torch_fused,
)
from offload.optimizer import InterleavedOptimizer
from offload.plan import OffloadPlan, OffloadSettings, aliased_subgroups, plan_offload

DEFAULT_CACHE = "~/.cache/lattice/offload_calibration.json"
CALIBRATION_VERSION = 2
"""Part of the cache key: bumped when what is measured changes (2: duplex factor, copies at a
staged subgroup's size), so figures cached by an older version are measured again."""


@dataclass
class Calibration:
    """Measured figures (bytes/s, seconds per parameter, parameters/s)."""

    device: str = "cpu"
    numel: int = 0
    h2d_bps: float = 0.0
    d2h_bps: float = 0.0
    cpu_kernel_params_per_s: dict = field(default_factory=dict)
    dev_s_per_param: float = 0.0
    cpu_s_per_param: float = 0.0
    cpu_s_per_param_io: float = 0.0
    nvme_read_bps: float = 1.0
    nvme_write_bps: float = 1.0
    nvme_read_bps_cpu: float = 1.0
    nvme_write_bps_cpu: float = 1.0
    io_backend: str = "none"
    nvme_duplex: float = 1.0
    """(read time + write time) / time with both in flight, clamped to [1, 2]; 1 when not
    measured (the conservative reading: reads and writes share the disk)."""

    def best_cpu_kernel(self) -> str:
        """The CPU kernel with the highest measured throughput; ``torch_fused`` (no build, no
        extra threads) unless another one is more than 5% faster, since closer calls are
        within the measurement noise."""
        k = self.cpu_kernel_params_per_s
        if not k:
            return "torch_fused"
        best = max(k, key=k.get)
        if "torch_fused" in k and k[best] <= 1.05 * k["torch_fused"]:
            return "torch_fused"
        return best

    def table(self) -> str:
        """A plain-text table of the figures."""
        gb = lambda x: f"{x / 1e9:8.2f} GB/s"  # noqa: E731
        rows = [
            ("device", self.device),
            ("host->device copy", gb(self.h2d_bps)),
            ("device->host copy", gb(self.d2h_bps)),
            *[
                (f"CPU AdamW kernel {k}", f"{v / 1e6:8.1f} Mparam/s")
                for k, v in self.cpu_kernel_params_per_s.items()
            ],
            ("device update path", f"{1e-6 / self.dev_s_per_param:8.1f} Mparam/s"),
            ("CPU update path", f"{1e-6 / self.cpu_s_per_param:8.1f} Mparam/s"),
            ("CPU update path, disk busy", f"{1e-6 / self.cpu_s_per_param_io:8.1f} Mparam/s"),
            (f"NVMe read ({self.io_backend})", gb(self.nvme_read_bps)),
            (f"NVMe write ({self.io_backend})", gb(self.nvme_write_bps)),
            ("NVMe read, CPU busy", gb(self.nvme_read_bps_cpu)),
            ("NVMe write, CPU busy", gb(self.nvme_write_bps_cpu)),
            ("NVMe read+write at once", f"{self.nvme_duplex:8.2f} x (duplex)"),
        ]
        w = max(len(a) for a, _ in rows)
        return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _copy_bw(src: torch.Tensor, dst: torch.Tensor, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        if dst.is_cuda or src.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        if dst.is_cuda or src.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return src.numel() * 4 / _median(times)


def time_placement_step(
    placement: str,
    numel: int,
    device: torch.device,
    repeats: int = 5,
    cpu_kernel: str = "torch_fused",
) -> float:
    """Median seconds per subgroup of ``numel`` params of ``InterleavedOptimizer.step``.

    Several subgroups are stepped together so that their working set (>= 256 MB, at most 16
    subgroups) exceeds the CPU caches, as a real model's does; timing one cache-resident
    subgroup overestimates the throughput. The norm is computed; clipping does not trigger.
    """
    k = max(1, min(16, -(-(256 << 20) // (28 * numel))))
    params = []
    for _ in range(k):
        p = torch.nn.Parameter(torch.randn(numel, device=device))
        p.grad = torch.randn(numel, device=device)
        params.append(p)
    settings = OffloadSettings(placement=placement, subgroup_size=numel, cpu_kernel=cpu_kernel)
    opt = InterleavedOptimizer(plan_offload(params, settings), lr=1e-3)
    opt.step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    opt.close()
    return _median(times) / k


def choose_list_kernel(plan: OffloadPlan) -> str:
    """The kernel for in-place updates of aliased subgroups under ``cpu_kernel=auto``: torch's
    fused kernel timed against the plan's pick on scratch lists shaped like the largest aliased
    subgroup (DeepSpeed pays a call per tensor, torch one per list, so many small tensors
    favour torch)."""
    aliased = aliased_subgroups(plan)
    if not aliased or plan.cpu_kernel == "torch_fused":
        return plan.cpu_kernel
    sg = max(aliased, key=lambda s: s.numel)
    kernels = {"torch_fused": torch_fused, plan.cpu_kernel: make_kernel(plan.cpu_kernel)}
    speed = rank_list_kernels(kernels, [p.numel() for p in sg.params])
    return "torch_fused" if speed["torch_fused"] > speed[plan.cpu_kernel] else plan.cpu_kernel


class _Busy:
    """Run ``fn`` in a loop on a background thread while the ``with`` block runs."""

    def __init__(self, fn) -> None:
        self.fn, self.stop = fn, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.fn()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        self.thread.join()


def _io_bw(io: AsyncFileIO, folder: Path, nbytes: int, repeats: int = 3) -> tuple[float, float]:
    """(read, write) bytes/s moving subgroup-sized blocks one at a time, as the pipeline does.

    Each pass covers >= 256 MB over several files (at most 16): a single small file written and
    read back at once can be served from a (virtual) disk's cache and overstate the bandwidth.
    """
    k = max(1, min(16, -(-(256 << 20) // nbytes)))
    buf = io.empty(nbytes // 4).fill_(1.0)  # the staging buffers the optimizer will use
    paths = [folder / f"calib_{os.getpid()}_{threading.get_ident()}_{i}.bin" for i in range(k)]
    w, r = [], []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for path in paths:
                io.write(buf, path).wait()
            w.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for path in paths:
                io.read(buf, path).wait()
            r.append(time.perf_counter() - t0)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
        io.free(buf)
    return k * nbytes / _median(r), k * nbytes / _median(w)


def _io_duplex(io: AsyncFileIO, folder: Path, nbytes: int, repeats: int = 3) -> float:
    """Duplex factor of the disk: (reads alone + writes alone) / (each read paired with a write
    to another file, both in flight), over >= 256 MB a pass; median, clamped to [1, 2]."""
    k = max(1, min(16, -(-(256 << 20) // nbytes)))
    a, b = io.empty(nbytes // 4).fill_(1.0), io.empty(nbytes // 4).fill_(2.0)
    paths = [folder / f"duplex_{os.getpid()}_{i}.bin" for i in range(k + 1)]
    ratios = []
    try:
        for path in paths:
            io.write(a, path).wait()
        for _ in range(repeats):
            t0 = time.perf_counter()
            for path in paths[:k]:
                io.read(a, path).wait()
            for path in paths[:k]:
                io.write(b, path).wait()
            t2 = time.perf_counter()
            for i in range(k):
                r, w = io.read(a, paths[i + 1]), io.write(b, paths[i])
                r.wait()
                w.wait()
            ratios.append((t2 - t0) / (time.perf_counter() - t2))
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
        io.free(a)
        io.free(b)
    return min(2.0, max(1.0, _median(ratios)))


def measure(device: torch.device, nvme_path: str | None, numel: int = 1 << 22) -> Calibration:
    """Run every measurement (a few seconds for the default 4M-parameter subgroup)."""
    cal = Calibration(device=str(device), numel=numel)
    # Copies at the size a staged subgroup moves: its 3 state rows (12 bytes a parameter).
    host = aligned_empty(3 * numel).fill_(1.0)
    dev = torch.empty(3 * numel, device=device)
    cal.h2d_bps = _copy_bw(host, dev)
    cal.d2h_bps = _copy_bw(dev, host)
    names = ["torch_fused", "torch_foreach"]
    if deepspeed_op_ready("cpu_adam"):
        names.append("ds_cpu_adam")
    cal.cpu_kernel_params_per_s = rank_kernels(names, numel)
    kernel = cal.best_cpu_kernel()
    cal.dev_s_per_param = time_placement_step("device", numel, device) / numel
    cal.cpu_s_per_param = time_placement_step("cpu", numel, device, cpu_kernel=kernel) / numel
    cal.cpu_s_per_param_io = cal.cpu_s_per_param
    if nvme_path:
        _measure_nvme(cal, Path(nvme_path) / "calibration", device, kernel)
    return cal


def _fastest_io(folder: Path, nbytes: int) -> tuple[tuple[float, float], AsyncFileIO]:
    """((read, write) bytes/s, open file I/O) of the faster backend, by the slower of its
    read and write (it becomes the NVMe tier's under ``io_backend=auto``)."""
    best = None
    for name in ("threads", "deepspeed"):
        if name == "deepspeed" and not deepspeed_op_ready("async_io"):
            continue
        try:
            trial = AsyncFileIO(folder, name)
        except RuntimeError:
            continue
        if trial.backend != name:  # no O_DIRECT here: the buffered fallback
            if best is not None:
                best[1].close()
            return _io_bw(trial, folder, nbytes), trial
        bw = _io_bw(trial, folder, nbytes)
        if best is None or min(bw) > min(best[0]):
            if best is not None:
                best[1].close()
            best = (bw, trial)
        else:
            trial.close()
    return best


def _measure_nvme(cal: Calibration, folder: Path, device: torch.device, kernel: str) -> None:
    """The NVMe figures of ``cal``: bandwidth of the faster backend, duplex factor, and the
    disk and the CPU update each measured while the other is busy."""
    folder.mkdir(parents=True, exist_ok=True)
    numel = cal.numel
    nbytes = 12 * numel
    (cal.nvme_read_bps, cal.nvme_write_bps), io = _fastest_io(folder, nbytes)
    cal.io_backend = io.backend
    cal.nvme_duplex = _io_duplex(io, folder, nbytes)
    k = make_kernel(kernel)
    p, g, m, v = (torch.rand(numel) for _ in range(4))
    h = AdamHyper(1e-3, 0.9, 0.95, 1e-8, 0.0, 1)
    with _Busy(lambda: k(p, g, m, v, h)):
        cal.nvme_read_bps_cpu, cal.nvme_write_bps_cpu = _io_bw(io, folder, nbytes)
    io2 = AsyncFileIO(folder, io.backend)
    with _Busy(lambda: _io_bw(io2, folder, nbytes, repeats=1)):
        cal.cpu_s_per_param_io = (
            time_placement_step("cpu", numel, device, cpu_kernel=kernel) / numel
        )
    io.close()
    io2.close()


def _cache_key(device: torch.device, nvme_path: str | None, numel: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (
        f"v{CALIBRATION_VERSION}|{socket.gethostname()}|{name}|{nvme_path or '-'}|"
        f"torch {torch.__version__}|{numel}"
    )


def calibrate(
    device: torch.device,
    nvme_path: str | None,
    numel: int = 1 << 22,
    cache: str = DEFAULT_CACHE,
    refresh: bool = False,
    verbose: bool = True,
) -> Calibration:
    """Cached measurements for this machine (measured and stored on the first call).

    Args:
        cache: JSON file of cached figures (empty string disables the cache).
        refresh: measure again even when cached.
    """
    key = _cache_key(device, nvme_path, numel)
    path = Path(os.path.expanduser(cache)) if cache else None
    stored: dict = {}
    if path is not None and path.exists():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError:
            stored = {}
    if key in stored and not refresh:
        cal = Calibration(**stored[key])
    else:
        cal = measure(device, nvme_path, numel)
        if path is not None:
            stored[key] = asdict(cal)
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
                json.dump(stored, f, indent=1)
            os.replace(f.name, path)
    if verbose and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print(f"offload calibration ({key}):\n{cal.table()}", flush=True)
    return cal
