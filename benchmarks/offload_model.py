"""Performance model vs measurement: predicted and measured update-phase time per placement.

Must show 5 of issue 7 (CPU part). The calibration (``offload.calibrate.measure``, run fresh
at the subgroup size used, once per round between the measured steps; each figure's median over
the rounds is used, since the machine is shared) feeds ``offload.perf_model.predict_update_time``;
each placement (all ``device``, ``stage``, ``cpu`` or ``nvme``; the mixes ``device,cpu``,
``cpu,nvme`` and ``device,stage,cpu,nvme`` cycled over the subgroups; ``auto``: the model's own
choice) is then run for real with ``InterleavedOptimizer.step`` (global norm, clipping,
updates, NVMe pipeline) on the same subgroups, steps of the placements interleaved
round-robin in an order rotated every round, medians reported. The model is
within tolerance when ``|predicted / measured - 1| <= 0.25``.

On a machine without an accelerator the "device" is the CPU (``same_resource``: times add). The
GPU half of Must show 5 (interleaved iteration time beats all-CPU offload) needs a GPU.

Run: ``python -m benchmarks.offload_model [--subgroup N] [--subgroups K] [--path DIR]``
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch

from benchmarks.common import median, write_results

PLACEMENTS = (
    "device",
    "stage",
    "cpu",
    "nvme",
    "device,cpu",
    "cpu,nvme",
    "device,stage,cpu,nvme",
    "auto",
)
"""Whole-model placements, mixed ones (a list is cycled over the subgroups) and the model's
own choice."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subgroup", type=int, default=1 << 21)
    ap.add_argument("--subgroups", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=len(PLACEMENTS))
    ap.add_argument("--path", default="/var/tmp")
    args = ap.parse_args()

    from offload.build import interleaved_optimizer
    from offload.calibrate import Calibration, calibrate
    from offload.perf_model import predict_update_time

    root = tempfile.mkdtemp(prefix="lattice-offload-model-", dir=args.path)
    dev = torch.device("cpu")
    try:
        cals = []
        first = calibrate(dev, root, numel=args.subgroup, cache="", verbose=False)
        gen = torch.Generator().manual_seed(0)
        opts = {}
        for pl in PLACEMENTS:
            params = []
            for _ in range(args.subgroups):
                p = torch.nn.Parameter(torch.randn(args.subgroup, generator=gen) * 0.02)
                p.grad = torch.randn(args.subgroup, generator=gen) * 1e-3
                params.append(p)
            opts[pl] = interleaved_optimizer(
                params,
                lr=1e-3,
                placement=pl,
                subgroup_size=args.subgroup,
                nvme_path=root,
                max_grad_norm=0.0,
                cpu_kernel=first.best_cpu_kernel(),
                calibration=first,
                device_budget_bytes=0,
            )
        for opt in opts.values():
            opt.step()
        times: dict[str, list[float]] = {pl: [] for pl in PLACEMENTS}
        for r in range(args.repeats):
            # A fresh calibration every round, so that it and the steps see the same load.
            cals.append(calibrate(dev, root, numel=args.subgroup, cache="", verbose=False))
            # Rotated order: every placement takes every position (right after the calibration,
            # after the NVMe-heavy ones, ...) equally often.
            for pl in PLACEMENTS[r % len(PLACEMENTS) :] + PLACEMENTS[: r % len(PLACEMENTS)]:
                t0 = time.perf_counter()
                opts[pl].step()
                times[pl].append(time.perf_counter() - t0)
        cal = Calibration(
            **{
                k: median([getattr(c, k) for c in cals])
                if isinstance(getattr(first, k), float)
                else getattr(first, k)
                for k in Calibration.__dataclass_fields__
            }
        )
        cal.cpu_kernel_params_per_s = {
            k: median([c.cpu_kernel_params_per_s[k] for c in cals])
            for k in first.cpu_kernel_params_per_s
        }
        print(cal.table())
        rows = []
        for pl, opt in opts.items():
            numels = [sg.numel for sg in opt.subgroups]
            chosen = [sg.placement for sg in opt.subgroups]
            pred = predict_update_time(numels, chosen, cal, same_resource=True)
            meas = median(times[pl])
            rows.append(
                {
                    "placement": pl,
                    "subgroups": ",".join(f"{k}:{v}" for k, v in opt.placement_summary().items()),
                    "predicted_s": pred,
                    "measured_s": meas,
                    "pred/meas": pred / meas,
                    "within_25%": abs(pred / meas - 1) <= 0.25,
                }
            )
            print(
                f"{pl:>7} [{rows[-1]['subgroups']}]: predicted {pred * 1e3:.1f} ms, measured "
                f"{meas * 1e3:.1f} ms, ratio {pred / meas:.3f}"
            )
            opt.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    notes = (
        f"{args.subgroups} subgroups of {args.subgroup} params, CPU-only machine (the 'device' "
        f"is the CPU); calibration measured fresh once per round in the same run (medians of each figure):\n\n```\n{cal.table()}\n```\n\n"
        f"{args.repeats} interleaved steps per placement after one warm-up, order rotated every "
        "round, medians. No GPU this "
        "session: the GPU iteration-time comparison (interleaved vs all-CPU) is not measured."
    )
    write_results(
        "offload_model",
        {"calibration": cal.__dict__, "times_s": times, "rows": rows},
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
