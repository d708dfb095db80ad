"""CPU optimizer update throughput: ours vs DeepSpeedCPUAdam vs torch AdamW (default, foreach,
fused), as params/s and as a fraction of the machine's memory bandwidth.

Must show 3 of issue 7. Every optimizer updates the same fp32 parameters (4 tensors of N/4
elements, gradients fixed) with AdamW (lr 1e-3, betas (0.9, 0.95), weight decay 0.1); steps of
the different optimizers are interleaved round-robin so machine noise hits all of them alike;
the median time of each is reported. Timed is the update phase as a trainer runs it: the
global gradient norm and finite check (clip/skip decision; the clip threshold is set so that
clipping does not trigger, keeping the work identical across steps) and the optimizer
step. "Ours" is the whole ``InterleavedOptimizer.step`` with ``placement=cpu`` and
``cpu_kernel=auto``: global gradient norm and finite check, then the kernel. The parameters
of a CPU-resident model are views of the subgroup's fp32 master row, so the kernel updates
them in place (no gradient copy, no copy back), and ``auto`` picks the kernel by measuring:
the calibration's fastest on a flat buffer, then torch's fused kernel against it on scratch
lists shaped like the subgroup's parameters (DeepSpeed's op is one call per tensor). The
row's label names the kernel chosen. On a GPU machine the copies every offload engine makes
(gradients down, weights up) come on top for us and for the peers alike.

Memory-bandwidth model: the timed update phase reads g once for the global norm, then AdamW
reads p, g, m, v and writes p, m, v (all in place, so no write-allocate traffic): 8 fp32 = 32
bytes per parameter (28 of them the update itself). ``fraction_of_mem_bw = params/s * 32 /
mem_bw``. ``mem_bw`` is measured in the same run, between rounds (so it sees the same machine
load), with a STREAM-style kernel shaped like AdamW's accesses: the in-place triad
``a += s * b`` (reads a, b; writes a; 12 bytes per element, nothing hidden), on arrays each at
least twice the last-level cache, through torch's intra-op threads (the threads the fused and
foreach kernels use; DeepSpeed's OpenMP pool has the same size). STREAM's own out-of-place
triad ``a = b + s * c`` is reported too, with STREAM's count (3 arrays: 12 bytes per fp32
element; a real machine also reads a's lines before writing them, 16 bytes in all, so that
figure reads ~25% low: measured here ~22 GB/s against ~30 GB/s in place). The fraction
only measures DRAM bandwidth where the step's working set (16 bytes per parameter) is larger
than the last-level cache; smaller sizes run from the cache and may exceed 1.

Every timed step starts with cold caches: a read of an array twice the last-level cache
evicts whatever the previous step left (in training the optimizer step follows the backward
pass, which does the same). Without it, at 1M parameters (16 MB of state, cache-resident) a
step's time depended on which optimizer ran just before it (a fixed rotation gives each the
same predecessor every round), up to 1.3x, and the ratio of medians drifted away from the
same-round ratio. ``--warm`` turns the eviction off.

Short steps are noisier on a shared machine, so sizes below 100M get proportionally more
rounds (``--repeats`` x 1e8 / params, at most ``--max-repeats``).

Run: ``python -m benchmarks.offload_optimizer [--sizes 1e6 1e7 1e8] [--repeats 15]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import median, write_results

BYTES_PER_PARAM = 32
"""Bytes one timed update phase moves per fp32 parameter: 4 (norm reads g) + 28 (AdamW)."""


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache sysfs reports (0 when unknown)."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG")) * mult)
    return best


class MemBandwidth:
    """Memory bandwidth by STREAM-style triads on arrays far beyond the last-level cache,
    sampled between optimizer steps so it sees the same machine load they do."""

    def __init__(self, llc_bytes: int) -> None:
        numel = max(1 << 27, 2 * llc_bytes // 4)  # each array >= 512 MiB and >= 2x the LLC
        self.a, self.b, self.c = (torch.rand(numel) for _ in range(3))  # pages first-touched
        self.samples: dict[str, list[float]] = {"inplace_triad": [], "stream_triad": []}

    def sample(self) -> None:
        n = self.a.numel()
        t0 = time.perf_counter()
        self.a.add_(self.b, alpha=1e-3)  # a += s*b: read a, b; write a
        self.samples["inplace_triad"].append(12 * n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        torch.add(self.b, self.c, alpha=3.0, out=self.a)  # a = b + s*c: 3 fp32 arrays
        self.samples["stream_triad"].append(12 * n / (time.perf_counter() - t0))

    def evict(self) -> None:
        """Read one array (>= 2x the last-level cache): what any earlier step left in the
        caches is gone, as after a backward pass."""
        self.c.sum()

    def median(self, kind: str = "inplace_triad") -> float:
        return median(self.samples[kind])


def make_params(numel: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    ps = []
    for _ in range(4):
        p = torch.nn.Parameter(torch.randn(numel // 4, generator=gen) * 0.02)
        p.grad = torch.randn(numel // 4, generator=gen) * 1e-3
        ps.append(p)
    return ps


def build_optimizers(params: list[torch.nn.Parameter], subgroup: int) -> dict[str, object]:
    from offload.build import interleaved_optimizer
    from offload.calibrate import calibrate
    from offload.kernels import deepspeed_op_ready

    kw = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}
    opts: dict[str, object] = {
        "ours": interleaved_optimizer(
            params,
            **kw,
            placement="cpu",
            cpu_kernel="auto",
            calibration=calibrate(torch.device("cpu"), None, numel=subgroup, cache=""),
            subgroup_size=subgroup,
            max_grad_norm=1e9,
        ),
        "torch_default": torch.optim.AdamW(params, **kw),
        "torch_foreach": torch.optim.AdamW(params, **kw, foreach=True),
        "torch_fused": torch.optim.AdamW(params, **kw, fused=True),
    }
    if deepspeed_op_ready("cpu_adam"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opts["deepspeed_cpu_adam"] = DeepSpeedCPUAdam(params, **kw, adamw_mode=True)
    return opts


def deepspeed_missing() -> str:
    """Why DeepSpeedCPUAdam is not among the peers ('' when it is)."""
    from offload.kernels import deepspeed_installed, deepspeed_op_ready

    if deepspeed_op_ready("cpu_adam"):
        return ""
    if not deepspeed_installed():
        return "DeepSpeed is not installed (pip install deepspeed)"
    return (
        "DeepSpeed's cpu_adam op is not built (DS_BUILD_CPU_ADAM=1 pip install deepspeed, "
        "or `make install`)"
    )


def update_phase(opt: object, params: list[torch.nn.Parameter]) -> None:
    """Global gradient norm + finite check (the clip/skip decision every trainer makes), then the
    step. Ours takes that decision inside ``step``; the peers get it from torch."""
    if not hasattr(opt, "owns_grad_clip"):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(norm).item():
            return
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    ap.add_argument("--repeats", type=int, default=15, help="rounds at 100M params")
    ap.add_argument("--max-repeats", type=int, default=300)
    ap.add_argument(
        "--warm",
        dest="cold",
        action="store_false",
        help="do not evict the caches before each timed step (steps then start from whatever "
        "the previous optimizer left there)",
    )
    ap.add_argument("--subgroup", type=int, default=1 << 22)
    args = ap.parse_args()
    missing = deepspeed_missing()
    if missing:
        print(f"deepspeed_cpu_adam is left out: {missing}", flush=True)
    llc = last_level_cache_bytes()
    bw = MemBandwidth(llc)
    for _ in range(3):
        bw.sample()
    rows, raw, pending, rounds = [], {}, [], {}
    kernel = None
    for size in args.sizes:
        n = int(size)
        params = make_params(n)
        opts = build_optimizers(params, min(args.subgroup, n))
        ours = opts["ours"]
        kernel = ours.cpu_list_kernel_name  # the kernel its aliased (in-place) subgroups use
        for opt in opts.values():  # warm-up (state allocation, first-touch)
            update_phase(opt, params)
        times: dict[str, list[float]] = {k: [] for k in opts}
        repeats = max(args.repeats, min(args.max_repeats, int(args.repeats * 1e8 / n)))
        rounds[str(n)] = repeats
        for r in range(repeats):
            # Rotate the order so every optimizer takes every position equally often: the
            # first one after the bandwidth sample starts with a cold cache (at 1M params that
            # alone is ~1.7x), which a fixed or forward/reverse order hands to the same ones.
            k = r % len(opts)
            names = list(opts)[k:] + list(opts)[:k]
            for name in names:
                if args.cold:
                    bw.evict()
                t0 = time.perf_counter()
                update_phase(opts[name], params)
                times[name].append(time.perf_counter() - t0)
            bw.sample()
        med = {k: median(v) for k, v in times.items()}
        best_name = min((k for k in med if k != "ours"), key=med.get)
        best_peer = med[best_name]
        raw[str(n)] = times
        for name, t in med.items():
            pending.append(
                {
                    "params": n,
                    "optimizer": name + (f" ({kernel})" if name == "ours" else ""),
                    "median_step_s": t,
                    "Mparams_per_s": n / t / 1e6,
                    "vs_best_peer": best_peer / t,
                    # Same-round ratio: the machine's speed drifts between rounds (shared
                    # host); a ratio taken within each round cancels that drift.
                    "vs_best_peer_paired": median(
                        b / a for a, b in zip(times[name], times[best_name])
                    ),
                    "working_set_vs_llc": 16 * n / llc if llc else float("nan"),
                }
            )
        for opt in opts.values():
            if hasattr(opt, "close"):
                opt.close()
        del opts, params
    mem_bw, stream = bw.median(), bw.median("stream_triad")
    print(
        f"memory bandwidth: in-place triad {mem_bw / 1e9:.2f} GB/s, STREAM triad "
        f"{stream / 1e9:.2f} GB/s (STREAM's byte count), {torch.get_num_threads()} threads, "
        f"last-level cache {llc / 2**20:.0f} MiB"
    )
    for row in pending:
        row["fraction_of_mem_bw"] = row["Mparams_per_s"] * 1e6 * BYTES_PER_PARAM / mem_bw
        rows.append(row)
        print(
            f"{row['params']:>10} {row['optimizer']:>28}: {row['median_step_s'] * 1e3:9.2f} ms "
            f"{row['Mparams_per_s']:8.1f} Mparam/s  x{row['vs_best_peer']:.3f} of best peer  "
            f"{row['fraction_of_mem_bw']:.2f} of mem bw"
        )
    peers = "DeepSpeedCPUAdam, torch AdamW default/foreach/fused"
    if missing:
        peers = f"torch AdamW default/foreach/fused (deepspeed_cpu_adam left out: {missing})"
    notes = (
        f"Peers: {peers}. Memory bandwidth ({torch.get_num_threads()} torch threads, arrays of "
        f"{bw.a.numel() * 4 / 2**20:.0f} MiB each, last-level cache {llc / 2**20:.0f} MiB, "
        "median of samples taken between rounds): in-place triad a += s*b "
        f"{mem_bw / 1e9:.2f} GB/s (12 B/element), STREAM triad a = b + s*c "
        f"{stream / 1e9:.2f} GB/s (STREAM's count, 12 B/element in fp32, which leaves out the "
        "write-allocate read of a). fraction_of_mem_bw = params/s x 32 B / in-place triad bandwidth; 32 B = "
        "the norm's read of g + AdamW's reads of p, g, m, v and writes of p, m, v, all in "
        "place. working_set_vs_llc = 16 B/param (p, g, m, v) / last-level cache: where it is "
        "< 1 the update's second read of g (after the norm's) can hit the cache, so the "
        "fraction is not a pure DRAM figure. "
        + (
            "Caches evicted before every timed step (a read of 2x the LLC; cold, as after a "
            "backward pass). "
            if args.cold
            else "Caches not evicted between steps (--warm). "
        )
        + "vs_best_peer = best peer's median time / this one's (>= 0.95 is 'within "
        "5%'); vs_best_peer_paired = median over rounds of the same ratio within one round. 'ours' = full InterleavedOptimizer.step "
        f"(placement=cpu, kernel={kernel}, norm + copies included). Interleaved steps per "
        f"optimizer after one warm-up (rounds per size: {rounds}), order rotated each round, "
        "medians; one run."
    )
    write_results(
        "offload_optimizer",
        {
            "mem_bw_Bps": mem_bw,
            "stream_triad_Bps": stream,
            "mem_bw_samples_Bps": bw.samples,
            "bytes_per_param": BYTES_PER_PARAM,
            "last_level_cache_bytes": llc,
            "threads": torch.get_num_threads(),
            "missing_peers": {"deepspeed_cpu_adam": missing} if missing else {},
            "times_s": raw,
            "rows": rows,
            "ours_kernel": kernel,
            "rounds": rounds,
        },
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
