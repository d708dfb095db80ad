"""Measured pipeline bubble of GPipe, 1F1B and interleaved 1F1B vs. the analytic bubble.

Runs ``torch.distributed.pipelining`` schedules (the ones ``parallelism/pipeline.py`` builds) on
gloo ranks with stages made of plain matmul blocks (no sleeps). Per rank, busy time is measured
inside the stage (forward: around the block; backward: autograd markers at the stage's output and
input), and idle = wall - busy. Theory (Narayanan et al. 2021): bubble / total =
(p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v*m+p-1) for interleaved 1F1B with v stages per rank.

CPU caveat: with more ranks than cores, ranks that compute at the same time slow each other
down, which inflates busy time in the steady phase and so under-reports the bubble; the
machine this was written on has 2 cores, so p=2 figures are the clean ones. A micro-batch's
compute (hidden 512, 512 rows, 4 blocks: ~1 GFLOP forward) is sized to dwarf the per-message
gloo latency; with 256 x 256 the messages dominated and every schedule measured alike.

    python benchmarks/pipeline_bubble.py            # writes benchmarks/results/pipeline_bubble.*
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.distributed.harness import run_on_ranks

H, LAYERS, ROWS, REPEATS = 512, 4, 512, 5
RESULTS = Path(__file__).resolve().parent / "results"


class _Mark(torch.autograd.Function):
    """Identity whose backward records a timestamp (start or end of a stage's backward)."""

    @staticmethod
    def forward(ctx, x, clock, key):
        ctx.clock, ctx.key = clock, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.clock.mark(ctx.key)
        return g, None, None


class Clock:
    def __init__(self) -> None:
        self.busy, self._t0 = 0.0, 0.0

    def mark(self, key: str) -> None:
        now = time.perf_counter()
        if key == "bwd_start":
            self._t0 = now
        else:
            self.busy += now - self._t0


class TimedStage(nn.Module):
    """A stack of Linear+tanh blocks whose forward and backward compute time is recorded."""

    def __init__(self, clock: Clock, first: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(H, H), nn.Tanh())])
        self.clock, self.first = clock, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        x = _Mark.apply(x, self.clock, "bwd_end")
        y = _Mark.apply(self.net(x), self.clock, "bwd_start")
        self.clock.busy += time.perf_counter() - t0
        return y


def theory(kind: str, p: int, m: int, v: int) -> float:
    return (p - 1) / (v * m + p - 1) if kind == "interleaved_1f1b" else (p - 1) / (m + p - 1)


def _rank_fn(rank: int, world: int, configs: list) -> list[dict]:
    import torch.distributed as dist
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    out = []
    for kind, m in configs:
        v = 2 if kind == "interleaved_1f1b" else 1
        clock = Clock()
        torch.manual_seed(0)
        ids = [rank + i * world for i in range(v)]
        stages = [
            PipelineStage(TimedStage(clock, s == 0), s, world * v, torch.device("cpu")) for s in ids
        ]

        def loss_fn(y, t):
            return ((y - t) ** 2).mean()

        if kind == "interleaved_1f1b":
            sched = ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn, scale_grads=False)
        else:
            cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
            sched = cls(stages[0], m, loss_fn=loss_fn, scale_grads=False)
        x, t = torch.randn(m * ROWS, H), torch.randn(m * ROWS, H)
        fracs = []
        for it in range(REPEATS + 1):
            dist.barrier()
            clock.busy = 0.0
            t0 = time.perf_counter()
            args = (x,) if rank == 0 else ()
            sched.step(*args, target=t if any(s.is_last for s in stages) else None)
            wall = time.perf_counter() - t0
            if it:  # the first step includes shape inference
                fracs.append((wall - clock.busy) / wall)
        out.append({"schedule": kind, "p": world, "m": m, "v": v, "idle": fracs})
    return out


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    grid = {2: [2, 4, 8], 4: [4, 8]}
    for p, ms in grid.items():
        configs = [(k, m) for m in ms for k in ("gpipe", "1f1b", "interleaved_1f1b")]
        per_rank = run_on_ranks(_rank_fn, p, configs, timeout_s=300)
        for i, (kind, m) in enumerate(configs):
            v = per_rank[0][i]["v"]
            ranks = [statistics.median(r[i]["idle"]) for r in per_rank]
            rows.append(
                {
                    "schedule": kind,
                    "p": p,
                    "m": m,
                    "v": v,
                    "idle_per_rank": [round(x, 4) for x in ranks],
                    "idle_mean": round(statistics.mean(ranks), 4),
                    "theory": round(theory(kind, p, m, v), 4),
                }
            )
            print(rows[-1], flush=True)
    checks = []
    for r in rows:
        if r["schedule"] == "interleaved_1f1b":
            one = next(
                x for x in rows if x["schedule"] == "1f1b" and (x["p"], x["m"]) == (r["p"], r["m"])
            )
            checks.append(
                {
                    "p": r["p"],
                    "m": r["m"],
                    "interleaved_idle": r["idle_mean"],
                    "1f1b_idle": one["idle_mean"],
                    "ratio": round(r["idle_mean"] / one["idle_mean"], 3),
                    "interleaved_lower": r["idle_mean"] < one["idle_mean"],
                }
            )
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "hidden": H,
        "layers_per_stage": LAYERS,
        "rows_per_microbatch": ROWS,
        "repeats": REPEATS,
        "backend": "gloo/cpu",
        "torch": torch.__version__,
    }
    (RESULTS / "pipeline_bubble.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "interleaved_vs_1f1b": checks}, indent=2)
    )
    lines = [
        "# Pipeline bubble: measured idle fraction vs theory",
        "",
        f"gloo on CPU, {meta}. idle = (wall - busy) / wall per rank, median of {REPEATS} steps.",
        "",
        "| schedule | p | m | v | measured idle (mean of ranks) | theory | per rank |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['schedule']} | {r['p']} | {r['m']} | {r['v']} | {r['idle_mean']:.3f} | "
        f"{r['theory']:.3f} | {r['idle_per_rank']} |"
        for r in rows
    ]
    lines += [
        "",
        "| p | m | interleaved idle | 1F1B idle | ratio | interleaved lower |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {c['p']} | {c['m']} | {c['interleaved_idle']:.3f} | {c['1f1b_idle']:.3f} | "
        f"{c['ratio']} | {c['interleaved_lower']} |"
        for c in checks
    ]
    (RESULTS / "pipeline_bubble.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
