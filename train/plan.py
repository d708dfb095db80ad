"""``python -m train.plan``: per-rank memory, traffic and step time of a layout before launch,
and a search over the layouts of a cluster.

    python -m train.plan model=gpt_small parallel.tp=2 --world 8 --gpu h100
    python -m train.plan <overrides> --world 512 --nodes 64 --gpu h100 --search
    torchrun --nproc_per_node=8 -m train.plan --measure       # this machine's constants

The config is composed and validated exactly as the trainer does it (``train.cli.load_config``,
``train.trainer.validate_layout`` with ``ParallelDims`` of ``--world`` ranks, ``--world /
--nodes`` per host), so an invalid layout fails with the trainer's one line. The numbers come
from ``train.plan_model`` (formulas and constants documented there and in docs/performance.md).
``--search`` enumerates tp, pp (and its schedule), dp_shard, dp_replicate, sp, ep, the micro-
batch size, activation recompute and sequence-parallel norms; each candidate goes through the
same validation; those that do not fit in memory are excluded with the reason; the rest are
ranked by predicted step time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

from models.errors import LatticeUserError
from parallelism.dims import ParallelDims
from train.plan_model import (
    EFFICIENCY,
    GIB,
    GPU,
    GPUS,
    Efficiency,
    Layout,
    Memory,
    StepTime,
    Workload,
    comm_bytes,
    link_of,
    memory,
    step_time,
    with_overrides,
)

USAGE = """usage: python -m train.plan [KEY=VALUE ...] --world N [--gpu h100] [--nodes M] [--search]
       [--top K] [--set CONSTANT=VALUE ...] [--json FILE] | --measure"""


@dataclass
class Plan:
    """One layout's prediction."""

    layout: Layout
    memory: Memory
    comm: dict[str, float]
    time: StepTime
    tokens_per_s_per_gpu: float
    mfu: float
    fits: bool
    capacity: float


@dataclass
class Cluster:
    world: int
    gpus_per_node: int
    gpu: GPU
    eff: Efficiency

    @property
    def nodes(self) -> int:
        return self.world // self.gpus_per_node


# -- config -> workload and layout ----------------------------------------------------------------
def layout_of(job: Any, dims: ParallelDims) -> Layout:
    p, t = job.parallel, job.train
    return Layout(
        tp=dims.tp,
        pp=dims.pp,
        dp_replicate=dims.dp_replicate,
        dp_shard=dims.dp_shard,
        sp=dims.sp,
        ep=dims.ep,
        micro_batch=t.micro_batch_size,
        recompute=t.activation_checkpoint,
        sp_norms=p.sequence_parallel_norms,
        schedule=p.pp_schedule,
        virtual=p.pp_virtual,
    )


def dims_for(job: Any, cluster: Cluster) -> ParallelDims:
    p = job.parallel
    return ParallelDims(
        world_size=cluster.world,
        dp_replicate=p.dp_replicate,
        dp_shard=p.dp_shard,
        tp=p.tp,
        pp=p.pp,
        sp=p.sp,
        ep=p.ep,
        local_world_size=cluster.gpus_per_node,
        allow_cross_host_tp=p.allow_cross_host_tp,
    )


def validated(job: Any, cluster: Cluster) -> tuple[Workload, Layout]:
    """The trainer's checks for this job on ``cluster``; the workload and layout it runs."""
    from train.trainer import validate_layout

    dims = dims_for(job, cluster)
    family = validate_layout(job, dims)
    if not hasattr(family, "model_config"):
        from models.errors import ConfigError

        raise ConfigError(
            f"model.name={job.model.name}: the planner models the gpt and gpt_moe families only"
        )
    t = job.train
    work = Workload(
        family.model_config(),
        t.global_batch_size,
        t.seq_len,
        t.dtype,
        job.offload.kind,
        job.parallel.pp_microbatches,
    )
    return work, layout_of(job, dims)


def predict(work: Workload, lay: Layout, cluster: Cluster) -> Plan:
    from train.flops import gpt_step_flops

    mem = memory(work, lay)
    st = step_time(work, lay, cluster.gpu, cluster.gpus_per_node, cluster.eff)
    tokens = work.global_batch * work.seq_len
    model_flops = gpt_step_flops(work.cfg, work.global_batch, work.seq_len).model / lay.world
    peak = cluster.gpu.peak_tflops[work.dtype] * 1e12
    capacity = cluster.gpu.memory_gib * GIB * cluster.eff.memory_usable
    return Plan(
        lay,
        mem,
        comm_bytes(work, lay),
        st,
        tokens / st.total / lay.world,
        model_flops / st.total / peak,
        mem.total <= capacity,
        capacity,
    )


def plan_layout(
    overrides: list[str],
    world: int,
    gpu: str = "h100",
    nodes: int = 0,
    constants: dict[str, float] | None = None,
) -> Plan:
    """The prediction for a config (Hydra overrides) on ``world`` ranks of ``gpu``."""
    from train.cli import load_config

    job, _ = load_config(overrides)
    cluster = make_cluster(world, gpu, nodes, constants or {})
    work, lay = validated(job, cluster)
    return predict(work, lay, cluster)


def make_cluster(world: int, gpu: str, nodes: int, constants: dict[str, float]) -> Cluster:
    from models.errors import ConfigError

    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu}: use one of {sorted(GPUS)}")
    if world < 1:
        raise ConfigError(f"--world {world} must be >= 1")
    nodes = nodes or max(1, -(-world // 8))
    if world % nodes:
        raise ConfigError(f"--nodes {nodes} does not divide --world {world}")
    try:
        g, e = with_overrides(GPUS[gpu], EFFICIENCY, constants)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    return Cluster(world, world // nodes, g, e)


# -- search ---------------------------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(job: Any, cluster: Cluster) -> list[Layout]:
    """Every combination of degrees and knobs whose product is the world size (validated
    later); micro-batch sizes and replicate degrees are powers of two to keep the count small."""
    w, moe = cluster.world, hasattr(job.model, "n_experts")
    pow2 = [d for d in divisors(w) if d & (d - 1) == 0]
    out = []
    for tp in [d for d in pow2 if d <= cluster.gpus_per_node]:
        for pp in divisors(w // tp):
            for sp in [d for d in pow2 if d <= cluster.gpus_per_node and (w // tp // pp) % d == 0]:
                dp = w // (tp * pp * sp)
                for rep in [d for d in pow2 if dp % d == 0]:
                    for ep in [d for d in pow2 if (dp * sp) % d == 0] if moe else [1]:
                        deg = Layout(
                            tp=tp, pp=pp, dp_replicate=rep, dp_shard=dp // rep, sp=sp, ep=ep
                        )
                        out += _knobs(job, deg)
    return out


def _knobs(job: Any, deg: Layout) -> list[Layout]:
    per_rank = job.train.global_batch_size // deg.dp
    mbs = [m for m in (1, 2, 4, 8, 16) if per_rank and per_rank % m == 0]
    scheds = [("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2)] if deg.pp > 1 else [("1f1b", 1)]
    out = []
    for m in mbs:
        for rec in (False, True):
            for spn in (False, True) if deg.tp > 1 else (False,):
                for sched, v in scheds:
                    knobs = dict(micro_batch=m, recompute=rec, sp_norms=spn, schedule=sched)
                    out.append(replace(deg, virtual=v, **knobs))
    return out


def job_for(job: Any, lay: Layout) -> Any:
    """``job`` with the layout's degrees and knobs (for the trainer's validation)."""
    p = replace(
        job.parallel,
        tp=lay.tp,
        pp=lay.pp,
        sp=lay.sp,
        ep=lay.ep,
        dp_replicate=lay.dp_replicate,
        dp_shard=lay.dp_shard,
        sequence_parallel_norms=lay.sp_norms,
        pp_schedule=lay.schedule,
        pp_virtual=lay.virtual,
    )
    t = replace(job.train, micro_batch_size=lay.micro_batch, activation_checkpoint=lay.recompute)
    return replace(job, parallel=p, train=t)


def search(job: Any, cluster: Cluster) -> tuple[list[Plan], Counter]:
    """Valid layouts that fit, fastest first; and why the others were excluded."""
    fits: list[Plan] = []
    excluded: Counter = Counter()
    for cand in candidates(job, cluster):
        try:
            work, lay = validated(job_for(job, cand), cluster)
        except LatticeUserError as exc:
            excluded[f"invalid: {_reason(str(exc))}"] += 1
            continue
        plan = predict(work, lay, cluster)
        if plan.fits:
            fits.append(plan)
        else:
            excluded["does not fit in memory"] += 1
    fits.sort(key=lambda p: p.time.total)
    return fits, excluded


def _reason(msg: str) -> str:
    """The rule an error names, without its numbers (to count exclusions by reason)."""
    head = msg.split(":", 1)[0]
    return "".join(ch for ch in head if not ch.isdigit()).replace("=", "").strip()


# -- output ---------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def describe(plan: Plan, work: Workload, cluster: Cluster) -> str:
    lay, mem, st = plan.layout, plan.memory, plan.time
    lines = [
        f"layout: {lay.label()}",
        f"cluster: {cluster.world} ranks = {cluster.nodes} node(s) x {cluster.gpus_per_node} "
        f"{cluster.gpu.name}",
        f"workload: {work.cfg.n_layers} layers, dim {work.cfg.dim}, global batch "
        f"{work.global_batch} x {work.seq_len} tokens, {work.dtype}, "
        f"{work.n_micro(lay)} micro-batch(es) of {work.micro_rows(lay)} per rank",
        "memory per rank (most loaded pipeline stage), GiB:",
    ]
    names = {"params": "parameters", "grads": "gradients", "optim": "optimizer state"}
    for key in ("params", "grads", "optim", "activations", "buffers"):
        lines.append(f"  {names.get(key, key):<16}{_gib(mem.device[key])}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(
        f"  {'total':<16}{_gib(mem.total)}  of {plan.capacity / GIB:.1f} usable "
        f"({cluster.gpu.memory_gib:g} x {cluster.eff.memory_usable:g}): {verdict}"
    )
    for key, value in mem.host.items():
        lines.append(f"  host {names.get(key, key):<11}{_gib(value)}  (offload)")
    lines.append("communication per step per rank, GB sent (link):")
    for dim, nbytes in plan.comm.items():
        link = link_of(lay, dim, cluster.gpus_per_node) if nbytes else "-"
        lines.append(f"  {dim:<16}{nbytes / 1e9:10.3f}  ({link})")
    lines.append(
        f"predicted step: {st.total:.3f} s = compute {st.compute:.3f} + bubble {st.bubble:.3f}"
        f" + exposed comm {st.exposed_comm:.3f} + optimizer {st.optimizer:.3f}; "
        f"{plan.tokens_per_s_per_gpu:,.0f} tokens/s per rank, MFU {plan.mfu:.1%}"
    )
    return "\n".join(lines)


def describe_search(fits: list[Plan], excluded: Counter, top: int, cluster: Cluster) -> str:
    lines = [f"{len(fits)} layouts fit; ranked by predicted step time:"]
    lines.append(f"{'#':>3}  {'step s':>8}  {'tok/s/GPU':>10}  {'MFU':>6}  {'mem GiB':>8}  layout")
    for i, p in enumerate(fits[:top], 1):
        lines.append(
            f"{i:>3}  {p.time.total:8.3f}  {p.tokens_per_s_per_gpu:10,.0f}  {p.mfu:6.1%}  "
            f"{p.memory.total / GIB:8.1f}  {p.layout.label()}"
        )
    lines.append(f"excluded ({sum(excluded.values())}):")
    for reason, n in excluded.most_common():
        lines.append(f"  {n:>6}  {reason}")
    return "\n".join(lines)


def to_json(plan: Plan) -> dict:
    return {
        "layout": asdict(plan.layout),
        "memory_device": plan.memory.device,
        "memory_host": plan.memory.host,
        "comm_bytes": plan.comm,
        "step_time": {**asdict(plan.time), "total": plan.time.total},
        "tokens_per_s_per_gpu": plan.tokens_per_s_per_gpu,
        "mfu": plan.mfu,
        "fits": plan.fits,
    }


# -- measuring the constants ----------------------------------------------------------------------
def measure() -> dict[str, float]:
    """This machine's matmul throughput and, under torchrun, all-reduce bus bandwidth of the
    world group (run once inside a node and once across nodes for nvlink_gbps / ib_gbps)."""
    import os
    import time

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else 1024
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    out: dict[str, float] = {}

    def timed(fn: Any, reps: int) -> float:
        fn()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    out["matmul_tflops"] = 2 * n**3 / timed(lambda: a @ b, 10) / 1e12
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        x = torch.ones(64 * 2**20 if cuda else 2**20, device=dev)
        world = dist.get_world_size()
        t = timed(lambda: dist.all_reduce(x), 5)
        out["allreduce_bus_gbps"] = 2 * (world - 1) / world * x.numel() * 4 / t / 1e9
        dist.destroy_process_group()
    return out


# -- command line ---------------------------------------------------------------------------------
def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m train.plan", usage=USAGE, add_help=True)
    ap.add_argument("--world", type=int, default=0, help="ranks (GPUs) in the job")
    ap.add_argument("--gpu", default="h100", help=f"one of {sorted(GPUS)}")
    ap.add_argument("--nodes", type=int, default=0, help="hosts (default: world / 8)")
    ap.add_argument("--search", action="store_true", help="rank every valid layout")
    ap.add_argument("--top", type=int, default=10, help="layouts to list with --search")
    ap.add_argument("--set", action="append", default=[], metavar="CONSTANT=VALUE")
    ap.add_argument("--json", default="", help="also write the result as JSON to this file")
    ap.add_argument("--measure", action="store_true", help="measure this machine's constants")
    return ap.parse_known_args(argv)


def _constants(pairs: list[str]) -> dict[str, float]:
    from models.errors import ConfigError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--set {pair!r}: write CONSTANT=NUMBER (e.g. compute=0.45)")
    return out


def run(argv: list[str]) -> str:
    """The report for a command line (raises ``LatticeUserError`` for bad input)."""
    from models.errors import ConfigError
    from train.cli import load_config

    args, overrides = parse(argv)
    if args.measure:
        return json.dumps(measure(), indent=2)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise ConfigError(f"unknown option {bad[0]}: see `python -m train.plan --help`")
    if args.world < 1:
        raise ConfigError("--world N is required: the number of ranks (GPUs) to plan for")
    cluster = make_cluster(args.world, args.gpu, args.nodes, _constants(args.set))
    job, _ = load_config(overrides)
    if not args.search:
        work, lay = validated(job, cluster)
        plan = predict(work, lay, cluster)
        _write_json(args.json, to_json(plan))
        return describe(plan, work, cluster)
    fits, excluded = search(job, cluster)
    _write_json(args.json, {"ranked": [to_json(p) for p in fits[: args.top]]})
    text = describe_search(fits, excluded, args.top, cluster)
    if fits:
        work, _ = validated(job_for(job, fits[0].layout), cluster)
        text += "\n\nbest layout:\n" + describe(fits[0], work, cluster)
    return text


def _write_json(path: str, data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    try:
        print(run(sys.argv[1:] if argv is None else argv))
    except LatticeUserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
