"""NVMe tier bandwidth: our subgroup reads/writes (``offload.aio``) vs ``fio`` on the same path.

Must show 2 of issue 7: the NVMe tier reads and writes optimizer subgroups at >= 80% of the raw
disk bandwidth that ``fio`` (O_DIRECT, 1 MiB blocks, libaio) measures on the same folder in the
same run.

Like for like:

* Same layout. Each contender moves ``--subgroups`` files of one subgroup's state (``(3, N_pad)``
  fp32, 12 bytes per parameter) each, one file after the other: fio gets the file list with
  ``file_service_type=sequential``; ours keeps two subgroups in flight, as the optimizer's
  pipeline does (the read or write of subgroup i+1 is issued before subgroup i's is waited).
* Fresh files. Every round each contender deletes its files and writes new ones (``fallocate``d
  first, as fio and ``offload.tiers.reserve_file`` both do), then reads back what it wrote, so
  nobody reads data another one wrote more recently, or data that sat in a cache for rounds.
* Interleaved, rotated. In every round the contenders run back to back, the write phase first,
  and the order rotates each round so each one takes every position equally often (on a
  virtual disk the bandwidth drifts by 2x over minutes). Reported: medians, min-max spread,
  and the median of the per-round ratios to fio in the same round (paired), besides the ratio
  of medians; ``meets_0.8`` needs both.
* fio shapes: libaio, one job, 1 MiB blocks at queue depth 4, 16 and 64; the reference is the
  one with the highest median (so it is never a weak shape of fio). fio with 4 MiB blocks (the
  request size of our thread pool) runs too: once the buffers sit on huge pages a 4 MiB
  ``preadv`` leaves the guest as one request, and this virtio disk moves fewer, larger requests
  faster, so ``vs_fastest_fio`` also compares with fio at its best block size.
* Our buffers come from ``AsyncFileIO.empty`` (what the optimizer stages through). One more
  contender, ``threads_scattered``, uses buffers allocated and first filled the way they were
  before (``torch.empty`` filled by all OpenMP threads: physically scattered pages); it records
  what the page layout alone costs (see ``offload.aio``).

Writes end with an fsync of every file (fio: ``end_fsync=1``). The read data are checked.

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

FIO_SHAPES = {
    "fio_1M_qd4": (1, 4),
    "fio_1M_qd16": (1, 16),
    "fio_1M_qd64": (1, 64),
    "fio_4M_qd4": (4, 4),
    "fio_4M_qd16": (4, 16),
}
"""fio runs (block MiB, libaio queue depth; one job). The Must-show reference is the fastest
1 MiB shape; the 4 MiB shapes use the request size of our thread pool (``chunk_bytes``), so
``vs_fastest_fio`` compares with fio at its best on this disk, whatever the block size."""
MUST_SHOW_BLOCK_MIB = 1


class FioError(SystemExit):
    """fio is missing or failed: a one-line message instead of a traceback."""


def fio_bw(files: list[Path], rw: str, block_mib: int, iodepth: int, nbytes: int) -> float:
    """Bytes/s of fio (O_DIRECT, ``block_mib`` MiB blocks, libaio at ``iodepth``) moving
    ``nbytes`` over ``files`` (equal shares) one file after the other."""
    cmd = [
        "fio",
        "--name=raw",
        "--filename=" + ":".join(str(f) for f in files),
        "--file_service_type=sequential",
        f"--rw={rw}",
        f"--bs={block_mib}M",
        "--direct=1",
        "--ioengine=libaio",
        f"--iodepth={iodepth}",
        f"--size={nbytes}",
        "--end_fsync=1",
        "--output-format=json",
    ]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        job = json.loads(out[out.index("{") :])["jobs"][0]
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise FioError(
            f"offload_io: fio {rw} (bs={block_mib}M, iodepth {iodepth}) failed: {tail[0]}"
        ) from None
    except (ValueError, KeyError, IndexError) as e:
        raise FioError(f"offload_io: could not parse fio's JSON output ({e})") from None
    return float(job[rw]["bw_bytes"])


def ours_bw(io, bufs, files, write: bool) -> float:
    """Bytes/s moving every subgroup buffer to/from its file, two subgroups in flight."""
    nbytes = sum(b.numel() * b.element_size() for b in bufs)
    t0 = time.perf_counter()
    pending = None
    for b, f in zip(bufs, files):
        t = io.write(b, f) if write else io.read(b, f)
        if pending is not None:
            pending.wait()
        pending = t
    pending.wait()
    if write:  # O_DIRECT bypasses the page cache; the fsync matches fio's end_fsync
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return nbytes / (time.perf_counter() - t0)


def scattered_empty(numel: int):
    """A 4 KiB-aligned fp32 buffer the way ``aligned_empty`` made them before: a plain
    ``torch.empty`` whose pages are first touched by every OpenMP thread at once."""
    import torch

    raw = torch.empty(numel * 4 + 4096, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % 4096
    return raw[shift : shift + numel * 4].view(torch.float32)


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3g}-{max(xs):.3g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default="", help="folder on the disk to test (default: /var/tmp)")
    ap.add_argument("--subgroup-numel", type=int, default=1 << 22)
    # 16 x 48 MiB = 768 MiB a pass: shorter passes catch the virtual disk's bursts (one fio
    # sample of 2.9 GB/s next to 1.6 GB/s ones at 384 MiB)
    ap.add_argument("--subgroups", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()
    if shutil.which("fio") is None:
        raise FioError(
            "offload_io: fio is not on PATH; it measures the raw disk bandwidth this benchmark "
            "compares against. Install it (Debian/Ubuntu: apt-get install fio) and rerun."
        )

    from offload.aio import AsyncFileIO
    from offload.kernels import deepspeed_op_ready
    from offload.tiers import padded, reserve_file

    folder = Path(args.path or "/var/tmp")
    root = Path(tempfile.mkdtemp(prefix="lattice-offload-io-", dir=folder))
    n = padded(args.subgroup_numel)
    k = args.subgroups
    total = 12 * n * k
    try:
        ios = {"threads": AsyncFileIO(root, "threads")}
        if deepspeed_op_ready("async_io"):
            ios["deepspeed"] = AsyncFileIO(root, "deepspeed")
        else:
            print("DeepSpeed async_io is not built: the deepspeed column is left out")
        for name, io in ios.items():
            if io.backend != name or not io.direct:
                raise SystemExit(f"offload_io: {folder} does not support O_DIRECT ({name})")
        ours = {name: (io, [io.empty(3 * n) for _ in range(k)]) for name, io in ios.items()}
        ours["threads_scattered"] = (ios["threads"], [scattered_empty(3 * n) for _ in range(k)])
        for _, bufs in ours.values():
            for i, b in enumerate(bufs):
                b.fill_(float(i + 1))
        fio_names = list(FIO_SHAPES)
        names = fio_names + list(ours)
        files = {c: [root / c / f"sg{i:03d}.bin" for i in range(k)] for c in names}
        for c in names:
            (root / c).mkdir()
        samples: dict[str, list[float]] = {f"{c}_{d}": [] for c in names for d in ("write", "read")}
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for c in order:  # fresh files every round
                for f in files[c]:
                    f.unlink(missing_ok=True)
                    if c in ours:
                        reserve_file(f, 12 * n, "--path")
            for d in ("write", "read"):
                for c in order:
                    if c in ours:
                        io, bufs = ours[c]
                        if d == "read":  # untimed: make the check below mean something
                            for b in bufs:
                                b.zero_()
                        bw = ours_bw(io, bufs, files[c], write=d == "write")
                        if d == "read":
                            for i, b in enumerate(bufs):
                                if not bool((b == float(i + 1)).all()):
                                    raise SystemExit(f"offload_io: {c} read back wrong data")
                    else:
                        bw = fio_bw(files[c], d, *FIO_SHAPES[c], total)
                    samples[f"{c}_{d}"].append(bw)
            print(
                f"round {r + 1}/{args.repeats}: "
                + " ".join(
                    f"{c}={samples[f'{c}_write'][-1] / 1e9:.2f}/{samples[f'{c}_read'][-1] / 1e9:.2f}"
                    for c in names
                ),
                flush=True,
            )
        for _, bufs in ours.values():  # buffers from io.empty() must go before io.close()
            bufs.clear()
        for io in ios.values():
            io.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {key: median(v) for key, v in samples.items()}
    must = [c for c in fio_names if FIO_SHAPES[c][0] == MUST_SHOW_BLOCK_MIB]
    ref = {d: max(must, key=lambda c: med[f"{c}_{d}"]) for d in ("read", "write")}
    best = {d: max(fio_names, key=lambda c: med[f"{c}_{d}"]) for d in ("read", "write")}
    rows = []
    for c in names:
        for d in ("read", "write"):
            key, fkey = f"{c}_{d}", f"{ref[d]}_{d}"
            paired = [a / b for a, b in zip(samples[key], samples[fkey])]
            row = {
                "contender": c,
                "direction": d,
                "median_GBps": med[key] / 1e9,
                "spread_GBps": spread([x / 1e9 for x in samples[key]]),
                "fio_ref": ref[d],
                "ratio_of_medians": med[key] / med[fkey],
                "paired_ratio_median": median(paired),
                "paired_ratio_spread": spread(paired),
                "vs_fastest_fio": med[key] / med[f"{best[d]}_{d}"],
            }
            row["meets_0.8"] = (
                min(row["ratio_of_medians"], row["paired_ratio_median"]) >= 0.8 if c in ours else ""
            )
            rows.append(row)
    for row in rows:
        print(
            f"{row['contender']:>18} {row['direction']:>5}: {row['median_GBps']:.3f} GB/s "
            f"({row['spread_GBps']}), vs {row['fio_ref']}: {row['ratio_of_medians']:.3f} "
            f"(paired {row['paired_ratio_median']:.3f}, {row['paired_ratio_spread']}); "
            f"vs fastest fio {row['vs_fastest_fio']:.3f}"
        )
    df = subprocess.run(["df", "-T", str(folder)], capture_output=True, text=True)
    notes = (
        f"Subgroups of {args.subgroup_numel} params ({12 * n / 2**20:.0f} MiB of state each), "
        f"{k} files per pass ({total / 2**20:.0f} MiB), fresh files for every contender every "
        "round; fio: O_DIRECT, libaio, one job, (block MiB, iodepth) in "
        f"{list(FIO_SHAPES.values())}, the same file list read/written in order. fio_ref (the "
        "Must-show reference) is the fastest 1 MiB-block fio median; vs_fastest_fio divides by "
        "the fastest fio median of any block size (our thread pool issues 4 MiB requests). "
        f"{args.repeats} rounds, contenders back to back (writes, then reads of what each wrote), "
        "order rotated every round. ratio_of_medians = median / fio_ref's median; "
        "paired_ratio = this round's sample / fio_ref's sample in the same round (median and "
        "spread over rounds); meets_0.8 needs both >= 0.8. threads and deepspeed stage through "
        "AsyncFileIO.empty buffers (what the optimizer uses: huge-page backed); "
        "threads_scattered is the threads backend on buffers whose pages were first touched by "
        "several threads at once (how aligned_empty allocated before). fio uses its own "
        f"(malloc'd) buffers. Disk:\n\n```\n{df.stdout.strip()}\n```"
    )
    write_results(
        "offload_io",
        {
            "samples_Bps": samples,
            "medians_Bps": med,
            "fio_reference": ref,
            "fio_fastest": best,
            "rows": rows,
            "subgroup_numel": args.subgroup_numel,
            "subgroups": k,
            "fio_shapes": FIO_SHAPES,
            "repeats": args.repeats,
        },
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
