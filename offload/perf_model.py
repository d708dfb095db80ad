"""The performance model of the update phase and the placement it chooses.

Follows Deep Optimizer States' model: per subgroup of ``n`` parameters, a device update costs
``n * t_dev``, a CPU update ``n * t_cpu`` (gradient copy-out, kernel, parameter copy-in
included: ``offload.calibrate`` times the real code path), a staged device update adds
``12 n / h2d + 12 n / d2h`` of transfers, and an NVMe subgroup adds a read and a write of
``12 n`` bytes that overlap the neighbouring CPU updates (one read ahead, one write behind),
simulated event by event.

The pipeline keeps a read and a write in flight at once; how much they slow each other is the
disk's measured duplex factor ``d`` (``Calibration.nvme_duplex``): ``d = 1`` is simulated as
one queue that serves them in turn, ``d = 2`` as two independent queues, and a factor between
is a linear blend of the two predictions. (The two-queue model alone predicted 0.64-0.84 of
the measured NVMe-only time on a disk that measures d ~ 1.) The disk moves bytes at the rate
measured with the CPU busy for as long as CPU updates run, and at the idle rate otherwise.

Staged subgroups are updated inside the host loop, in order: on an accelerator they only
queue work on its side stream (device timeline), without one they take CPU time on the host
timeline, overlapping the NVMe I/O in flight. With ``same_resource`` (no accelerator: the
"device" is the CPU) everything runs on the same cores, so times add; on an accelerator the
device timeline runs concurrently with the CPU timeline and the phase ends with the later one.

``plan_placement`` keeps as many subgroups resident on the device as the device budget allows,
fills host memory up to the host budget, spills the rest to NVMe, and then picks how many
host-resident subgroups to stage through the device so the predicted time is smallest.
"""

from __future__ import annotations

from offload.tiers import OffloadConfigError, padded


def predict_update_time(
    numels: list[int], placements: list[str], cal: object, same_resource: bool
) -> float:
    """Predicted seconds of one optimizer step (norm included) for these subgroups.

    Args:
        numels: parameters per subgroup.
        placements: ``device``/``stage``/``cpu``/``nvme`` per subgroup.
        cal: an ``offload.calibrate.Calibration``.
        same_resource: the device is the CPU.
    """
    d = min(2.0, max(1.0, getattr(cal, "nvme_duplex", 1.0)))
    one = _simulate(numels, placements, cal, same_resource, shared_queue=True)
    if d == 1.0 or "nvme" not in placements:
        return one
    two = _simulate(numels, placements, cal, same_resource, shared_queue=False)
    return one + (d - 1.0) * (two - one)


def _simulate(
    numels: list[int], placements: list[str], cal: object, same_resource: bool, shared_queue: bool
) -> float:
    """One event-by-event pass of the update phase; NVMe reads and writes on one shared queue
    or on one queue each."""
    has_io = "nvme" in placements
    t_cpu = cal.cpu_s_per_param_io if has_io else cal.cpu_s_per_param
    dev_t = 0.0
    cpu_t = 0.0
    nv = [i for i, p in enumerate(placements) if p == "nvme"]
    io_bytes = [12 * padded(numels[i]) for i in nv]
    # Disk bandwidth while the CPU updates (measured under contention) vs while it waits: the
    # CPU is busy for ``cpu_work`` seconds of the I/O; the bytes moved then go at the busy
    # rate, the rest at the idle rate. (Blending the two rates by that time share instead
    # weighted *bytes* by a time fraction and charged the busy rate ~4x too often here.)
    cpu_work = sum(n * t_cpu for n, p in zip(numels, placements) if p in ("cpu", "nvme"))
    moved = sum(io_bytes)  # read once and written once
    t_free = moved / cal.nvme_read_bps + moved / cal.nvme_write_bps
    t_busy = moved / cal.nvme_read_bps_cpu + moved / cal.nvme_write_bps_cpu
    slow = 1.0
    if t_free > 0 and t_busy > t_free:
        busy = min(cpu_work, t_busy)
        slow = (busy + (1 - busy / t_busy) * t_free) / t_free
    read_b, write_b = cal.nvme_read_bps / slow, cal.nvme_write_bps / slow
    # Queue tails: with ``shared_queue`` an operation also waits for the other queue's tail.
    read_q = write_q = 0.0
    read_done: dict[int, float] = {}
    if nv:
        read_q = io_bytes[0] / read_b
        read_done[0] = read_q
    k = 0
    for n, pl in zip(numels, placements):
        if pl == "device":
            dev_t += n * cal.dev_s_per_param
        elif pl == "stage":
            t = n * cal.dev_s_per_param + 12 * n / cal.h2d_bps + 12 * n / cal.d2h_bps
            if same_resource:  # run in the host loop, in order, while NVMe I/O is in flight
                cpu_t += t
            else:  # queued on the device's side stream; the CPU goes on
                dev_t += t
        elif pl == "cpu":
            cpu_t += n * t_cpu
        else:
            if k + 1 < len(nv):  # issued before subgroup k is waited for
                start = max(cpu_t, read_q, write_q if shared_queue else 0.0)
                read_q = start + io_bytes[k + 1] / read_b
                read_done[k + 1] = read_q
            cpu_t = max(cpu_t, read_done[k]) + n * t_cpu
            start = max(cpu_t, write_q, read_q if shared_queue else 0.0)
            write_q = start + io_bytes[k] / write_b
            k += 1
    cpu_t = max(cpu_t, write_q)
    return dev_t + cpu_t if same_resource else max(dev_t, cpu_t)


def plan_placement(
    numels: list[int],
    cal: object,
    device_budget_bytes: int,
    host_budget_bytes: int,
    has_nvme: bool,
    same_resource: bool,
) -> list[str]:
    """Choose a placement per subgroup from the measured figures and the memory budgets."""
    out: list[str] = []
    used_dev = 0
    for n in numels:
        b = 12 * padded(n)
        if used_dev + b <= device_budget_bytes:
            out.append("device")
            used_dev += b
        else:
            out.append("cpu")
    if host_budget_bytes > 0:
        used = 3 * 16 * max((padded(n) for n in numels), default=0)  # staging slots
        for i, n in enumerate(numels):
            if out[i] != "cpu":
                continue
            if used + 12 * padded(n) <= host_budget_bytes:
                used += 12 * padded(n)
            elif has_nvme:
                out[i] = "nvme"
            else:
                raise OffloadConfigError(
                    f"offload.host_budget_mb={host_budget_bytes / 2**20:.0f} cannot hold the "
                    "optimizer state left after the device budget: raise it or set "
                    "offload.nvme_path"
                )
    host = [i for i, p in enumerate(out) if p == "cpu"]
    best, best_t = list(out), predict_update_time(numels, out, cal, same_resource)
    for k in range(1, len(host) + 1):
        trial = list(out)
        for j in range(k):  # spread the staged subgroups evenly among the CPU ones
            trial[host[(j * len(host)) // k]] = "stage"
        t = predict_update_time(numels, trial, cal, same_resource)
        if t < best_t:
            best, best_t = trial, t
    return best
