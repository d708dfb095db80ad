"""NVMe tier bandwidth: our subgroup reads/writes (``offload.aio``) vs ``fio`` on the same path.

Must show 2 of issue 7: the NVMe tier reads and writes optimizer subgroups at >= 80% of the raw
disk bandwidth that ``fio`` (O_DIRECT, 1 MiB blocks; the fastest of libaio at queue depth 16, libaio 4 jobs x
depth 4, and psync with 4 jobs) measures on the same folder in the
same run. Our side moves whole subgroup state blocks (``(3, N_pad)`` fp32, 12 bytes per
parameter) between aligned host buffers and preallocated files, exactly as the optimizer's
pipeline does (a read or write of subgroup i+1 is issued before subgroup i's is waited, so two
are in flight), through each backend: the thread pool over O_DIRECT ``preadv``/``pwritev``, and
DeepSpeed's ``async_io`` when it is built. Rounds interleave fio and our backends so that noise
from other processes hits all of them alike; medians are reported.

Run: ``python -m benchmarks.offload_io [--path DIR] [--subgroup-numel N] [--subgroups K]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import median, write_results

FIO_CONFIGS = {
    "libaio_qd16x1": ("libaio", 16, 1),
    "libaio_qd4x4": ("libaio", 4, 4),
    "psync_x4": ("psync", 1, 4),
}
"""fio shapes tried (engine, iodepth, jobs); the fastest median is the disk's raw bandwidth."""


def fio_bw(
    path: Path, rw: str, size_mb: int, iodepth: int, jobs: int = 1, engine: str = "libaio"
) -> float:
    """Bytes/s of fio (O_DIRECT, 1 MiB blocks, ``engine``, ``jobs`` x ``iodepth``) on ``path``."""
    cmd = [
        "fio",
        "--name=raw",
        f"--filename={path}",
        f"--rw={rw}",
        "--bs=1M",
        "--direct=1",
        f"--ioengine={engine}",
        f"--iodepth={iodepth}",
        f"--size={size_mb // jobs}M",
        f"--numjobs={jobs}",
        f"--offset_increment={size_mb // jobs}M",  # each job its own slice of the file
        "--group_reporting",
        "--end_fsync=1",
        "--output-format=json",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["read" if rw == "read" else "write"]["bw_bytes"])


def ours_bw(io, bufs, files, write: bool) -> float:
    """Bytes/s moving every subgroup buffer to/from its file, two subgroups in flight."""
    nbytes = sum(b.numel() * 4 for b in bufs)
    t0 = time.perf_counter()
    pending = None
    for b, f in zip(bufs, files):
        t = io.write(b, f) if write else io.read(b, f)
        if pending is not None:
            pending.wait()
        pending = t
    pending.wait()
    if write:  # O_DIRECT bypasses the page cache; fsync makes the comparison with fio exact
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return nbytes / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default="", help="folder on the disk to test (default: /var/tmp)")
    ap.add_argument("--subgroup-numel", type=int, default=1 << 22)
    ap.add_argument("--subgroups", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if shutil.which("fio") is None:
        raise SystemExit("fio not found: apt-get install fio")

    from offload.aio import AsyncFileIO, aligned_empty
    from offload.kernels import deepspeed_op_ready
    from offload.tiers import padded, reserve_file

    root = Path(tempfile.mkdtemp(prefix="lattice-offload-io-", dir=args.path or "/var/tmp"))
    try:
        n = padded(args.subgroup_numel)
        bufs = [aligned_empty(3 * n).fill_(float(i)) for i in range(args.subgroups)]
        total = sum(b.numel() * 4 for b in bufs)
        files = [root / f"subgroup_{i:05d}.bin" for i in range(args.subgroups)]
        for f, b in zip(files, bufs):
            reserve_file(f, b.numel() * 4, "--path")
        backends = {"threads": AsyncFileIO(root, "threads")}
        if deepspeed_op_ready("async_io"):
            backends["deepspeed"] = AsyncFileIO(root, "deepspeed")
        for name, io in backends.items():
            assert io.backend == name and io.direct, (name, io.backend, io.direct)
        fio_file = root / "fio.bin"
        size_mb = total >> 20
        fio_bw(fio_file, "write", size_mb, 16)  # lay the file out once
        names = [f"fio_{c}" for c in FIO_CONFIGS] + list(backends)
        samples = {f"{k}_{d}": [] for k in names for d in ("read", "write")}
        for _ in range(args.repeats):
            for d in ("write", "read"):
                for c, (engine, qd, jobs) in FIO_CONFIGS.items():
                    bw = fio_bw(fio_file, d, size_mb, qd, jobs, engine)
                    samples[f"fio_{c}_{d}"].append(bw)
                for name, io in backends.items():
                    samples[f"{name}_{d}"].append(ours_bw(io, bufs, files, write=d == "write"))
        for i, b in enumerate(bufs):  # the bytes came back intact
            assert bool((b == float(i)).all()), f"subgroup {i} read back wrong data"
        for io in backends.values():
            io.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {k: median(v) for k, v in samples.items()}
    for d in ("read", "write"):
        med[f"fio_{d}"] = max(med[f"fio_{c}_{d}"] for c in FIO_CONFIGS)
    rows = []
    for name in backends:
        for d in ("read", "write"):
            rows.append(
                {
                    "backend": name,
                    "direction": d,
                    "ours_GBps": med[f"{name}_{d}"] / 1e9,
                    "fio_GBps": med[f"fio_{d}"] / 1e9,
                    "ratio_vs_fio": med[f"{name}_{d}"] / med[f"fio_{d}"],
                    "meets_0.8": med[f"{name}_{d}"] >= 0.8 * med[f"fio_{d}"],
                }
            )
    for r in rows:
        print(
            f"{r['backend']:>9} {r['direction']:>5}: ours {r['ours_GBps']:.3f} GB/s, "
            f"fio {r['fio_GBps']:.3f} GB/s, ratio {r['ratio_vs_fio']:.3f}"
        )
    df = subprocess.run(["df", "-T", args.path or "/var/tmp"], capture_output=True, text=True)
    notes = (
        f"Subgroups of {args.subgroup_numel} params ({3 * n * 4 / 2**20:.0f} MiB of state each), "
        f"{args.subgroups} per pass ({total / 2**20:.0f} MiB); fio: O_DIRECT, bs=1M, "
        f"(engine, iodepth, jobs) in {list(FIO_CONFIGS.values())} (the fastest median is the "
        "reference), "
        f"same folder, same size; {args.repeats} interleaved rounds, "
        f"medians. Disk:\n\n```\n{df.stdout.strip()}\n```"
    )
    write_results(
        "offload_io",
        {
            "samples_Bps": samples,
            "medians_Bps": med,
            "rows": rows,
            "subgroup_numel": args.subgroup_numel,
            "subgroups": args.subgroups,
            "fio_configs": FIO_CONFIGS,
        },
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
