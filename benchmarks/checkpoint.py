"""Training stall per checkpoint: torch.save (sync) vs DCP async_save vs Lattice lazy_async.

One process, one model (Llama-style GPT, ~50M params; AdamW state: ~600 MB to save), the same
step for every method. Per method and repeat: train to a steady state, checkpoint after an
optimizer step, keep training. The stall is the issue's definition: the save call plus, for
every following iteration until the iteration time is back to baseline, its time minus the
no-checkpoint median. "Back to baseline" is taken as the first iteration that starts after the
checkpoint is durable (no background work is left to slow it); the baseline is the median of as
many iterations run right after without a checkpoint (a paired control, so slow phases of the
shared machine cancel instead of counting as stall). Methods rotate their order every repeat.
Also: time to durable (call -> committed and fsynced), peak extra host RSS while it runs, and
checkpoint bytes per second of stall. Training uses one intra-op thread so a core is free for
background work, as the accelerator leaves the host CPUs free in the setting DataStates-LLM
targets.

Usage: python -m benchmarks.checkpoint [--dim 640 --layers 10 --repeats 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from benchmarks.common import median, write_results
from checkpoint import Manager
from models.gpt import GPT, GPTConfig
from train.config import CheckpointArgs


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


class PeakRSS:
    """Peak resident set while the block runs, minus the start value = extra host memory.

    Uses the kernel's high-water mark (reset through ``/proc/self/clear_refs``) rather than a
    sampling thread: a thread waking every few milliseconds would take the GIL from the training
    loop it measures and be counted as checkpoint stall."""

    def __enter__(self) -> PeakRSS:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self.start = rss()
        self.peak = self.start
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(self.start, _status_kb("VmHWM") * 1024)


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--max-after", type=int, default=10, help="cap on iterations after a save")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU suite's setting)")
    ap.add_argument("--name", default="checkpoint", help="results file name")
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=600))
    torch.manual_seed(0)
    model = GPT(GPTConfig(dim=a.dim, n_layers=a.layers, n_heads=8, vocab_size=256)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    n_params = sum(p.numel() for p in model.parameters())
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=os.environ.get("BENCH_DIR", None)))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (a.batch, a.seq), generator=g).to(dev)
    mgr = Manager(
        CheckpointArgs(
            enabled=True, mode="lazy_async", dir=str(tmp / "ours"), keep_last=1, host_buffer_mb=2048
        ),
        tmp,
    )
    mgr.attach(model, opt)

    def step(before_update=None) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
        if before_update is not None:
            before_update()
        opt.step()
        sync()
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    base = median([step() for _ in range(8)])
    state_bytes = sum(p.numel() * 4 * 3 for p in model.parameters())

    def run(method: str, rep: int) -> dict:
        out = tmp / f"{method}-{rep}"
        durable: list[float] = []
        with PeakRSS() as mem:
            t_call = time.perf_counter()
            pending = None
            if method == "torch.save":
                out.mkdir(parents=True)
                torch.save(
                    {"model": model.state_dict(), "optim": opt.state_dict()}, out / "ckpt.pt"
                )
                fsync_tree(out)
                durable.append(time.perf_counter() - t_call)
            elif method == "dcp.async_save":
                sd = {"model": model.state_dict(), "optim": opt.state_dict()}
                pending = dcp.async_save(sd, checkpoint_id=str(out))
            else:
                mgr.save_async(rep + 1)
            first = time.perf_counter() - t_call  # the save call blocks this iteration
            times, blocked, started, durable_at = [], [0.0], [], [float("inf")]

            def timed_wait() -> None:
                t0 = time.perf_counter()
                mgr.wait_before_update()
                blocked[0] += time.perf_counter() - t0

            if method == "torch.save":
                durable_at[0] = time.perf_counter()

            def poll() -> None:
                """Note when the checkpoint became durable (committed and fsynced)."""
                if pending is not None and pending.done() and not durable:
                    pending.result()
                    fsync_tree(out)
                    durable.append(time.perf_counter() - t_call)
                    durable_at[0] = time.perf_counter()
                if method == "ours" and mgr.job is not None and mgr.job.done.is_set():
                    durable.append(mgr.job.durable_s)
                    durable_at[0] = mgr.job.t0 + mgr.job.durable_s
                    mgr.wait()

            # Measure iterations up to and including the first one that starts after the
            # checkpoint is durable: from there on nothing of it can slow training.
            while len(times) < a.max_after and not (started and durable_at[0] <= started[-1]):
                started.append(time.perf_counter())
                times.append(step(timed_wait if method == "ours" else None))
                poll()
            if pending is not None and not durable:
                pending.result()
                fsync_tree(out)
                durable.append(time.perf_counter() - t_call)
            if method == "ours" and mgr.job is not None:
                mgr.wait()
                durable.append(mgr.stats[-1]["durable_s"])
        # Paired control: as many iterations without a checkpoint, right after; their median is
        # the baseline each measured iteration is compared with.
        control = [step() for _ in range(max(3, len(times)))]
        base_i = median(control)
        extra = [t - base_i for t in times]
        stall = max(0.0, first + sum(extra))
        shutil.rmtree(out, ignore_errors=True)
        return {
            "stall_s": stall,
            "call_s": first,
            "blocked_before_update_s": blocked[0],
            "durable_s": durable[0],
            "peak_extra_rss_mb": (mem.peak - mem.start) / 2**20,
            "iters_until_baseline": len(times),
            "iter_excess_s": extra,
        }

    methods = ["torch.save", "dcp.async_save", "ours"]
    raw: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(a.repeats):
        for m in methods[rep % 3 :] + methods[: rep % 3]:
            for _ in range(2):  # settle between methods
                step()
            raw[m].append(run(m, rep))
            print(m, rep, {k: v for k, v in raw[m][-1].items() if k != "iter_excess_s"}, flush=True)
    summary = {}
    for m in methods:
        stall = median([r["stall_s"] for r in raw[m]])
        summary[m] = {
            "stall_s": stall,
            "call_s": median([r["call_s"] for r in raw[m]]),
            "blocked_before_update_s": median([r["blocked_before_update_s"] for r in raw[m]]),
            "time_to_durable_s": median([r["durable_s"] for r in raw[m]]),
            "peak_extra_host_mb": max(r["peak_extra_rss_mb"] for r in raw[m]),
            "bytes_per_s_of_stall": state_bytes / max(stall, 1e-6),
        }
    ratios = {
        "ours_stall_over_torch_save": summary["ours"]["stall_s"] / summary["torch.save"]["stall_s"],
        "ours_stall_over_dcp_async": summary["ours"]["stall_s"]
        / summary["dcp.async_save"]["stall_s"],
    }
    table = [{"method": m, **summary[m]} for m in methods]
    table += [
        {
            "method": f"ratio {k}",
            "stall_s": v,
            "call_s": "",
            "blocked_before_update_s": "",
            "time_to_durable_s": "",
            "peak_extra_host_mb": "",
            "bytes_per_s_of_stall": "",
        }
        for k, v in ratios.items()
    ]
    write_results(
        a.name,
        {
            "device": a.device,
            "params": n_params,
            "state_bytes": state_bytes,
            "baseline_iter_s": base,
            "repeats": a.repeats,
            "summary": summary,
            "ratios": ratios,
            "raw": raw,
        },
        table,
        notes=(
            f"GPT {n_params / 1e6:.1f}M params, {state_bytes / 2**20:.0f} MiB model+AdamW state, "
            f"baseline iteration {base:.3f}s (1 intra-op thread), median of {a.repeats} repeats "
            "(methods in rotating order). Stall = save call + the excess over baseline of every "
            "iteration until the first one that starts after the checkpoint is durable; baseline "
            "= median of as many iterations right after without a checkpoint (paired control). "
            "call_s = time in the "
            "save call; blocked_before_update_s = time ours waited for its snapshot before the "
            "optimizer step. CPU only (no GPU in this environment): pinned-memory D2H copies "
            "untested."
        ),
    )
    print(ratios)
    shutil.rmtree(tmp, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
