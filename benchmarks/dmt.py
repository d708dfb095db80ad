"""DMT benchmark: cross-host bytes and step time, flat table-wise vs SPTT vs SPTT + tower modules.

    python -m benchmarks.dmt            # writes benchmarks/results/dmt.json and dmt.md

Part 1 (bytes). On simulated topologies 2 hosts x 2 and 2 hosts x 4 local ranks (gloo ranks on
this machine, LOCAL_WORLD_SIZE set per rank), one training step (forward + backward) of each
layout; the bytes and messages each rank sends to ranks on other hosts are counted inside the
all-to-alls (``parallelism/dmt.py: Comm``) and compared with the closed form
(``analytic_cross_host_traffic``).

Part 2 (slow link). Every rank sleeps, after each all-to-all, ``peers x latency + remote bytes /
bandwidth`` (``SlowLink``): a simulated inter-host link. One run per topology interleaves every
layout with and without the link (``ROUNDS`` rounds of ``STEPS`` steps per cell, the order
rotated each round) and takes medians. The prediction is closed-form: no-link step time + the
link delay of the analytic byte *and* message counts (``SlowLink.delay(bytes, messages)``, the
slowest rank), which the run checks equals what the link was asked to sleep. The peer layout is
flat table-wise sharding (TorchRec's TW placement, through the same counted all-to-alls so that
bytes are comparable). No GPU in this environment: these are CPU/gloo figures of a simulated
link, not of a real network.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine, median
from tests.distributed.harness import run_on_ranks

NUM_SPARSE, NUM_DENSE, GROUPS, CARD, DIM, BATCH = 16, 4, 4, 32, 16, 64
KINDS = ("flat", "sptt", "sptt_tm")
LINK = {"latency_s": 5e-3, "bytes_per_s": 1e6}
MODES = ("no_link", "slow_link")
ROUNDS, STEPS, WARMUP = 20, 3, 3
TIMING_TOPOLOGIES = ((2, 2), (2, 4))
OUT = Path(__file__).resolve().parent / "results"


def _setup(rank: int, world: int, local_world: int, kind: str):
    from models.dlrm import DLRM
    from models.dmt import DMT
    from parallelism.dmt import Comm, ShardedDLRM, ShardedDMT
    from parallelism.init import materialize_and_init_
    from parallelism.topology import Topology, build_host_groups
    from train.recsys_data import SyntheticClicks

    topo = Topology(world, local_world)
    groups = build_host_groups(topo, rank)
    data = SyntheticClicks(NUM_SPARSE, GROUPS, CARD, NUM_DENSE, seed=0)
    towers = [[f"f{i}" for i in g] for g in data.groups]
    with torch.device("meta"):
        if kind == "flat":
            plain = DLRM(NUM_DENSE, NUM_SPARSE, DIM, CARD)
        else:
            plain = DMT(NUM_DENSE, towers, DIM, CARD, 1 if kind == "sptt_tm" else 0)
    materialize_and_init_(plain, 0)
    comm = Comm(topo, rank)  # the timing run switches comm.link on and off
    cls = ShardedDLRM if kind == "flat" else ShardedDMT
    model = cls(copy.deepcopy(plain), topo, groups, comm, rank)
    return topo, data, towers, model, comm


def _bytes(rank: int, world: int, local_world: int) -> dict:
    from parallelism.dmt import analytic_cross_host_traffic

    out = {}
    for kind in KINDS:
        topo, data, towers, model, comm = _setup(rank, world, local_world, kind)
        b = data.batch("train", 0, world * BATCH).slice(rank * BATCH, (rank + 1) * BATCH)
        F.binary_cross_entropy_with_logits(model(b.dense, b.sparse), b.labels).backward()
        k = [1] * len(towers) if kind == "sptt_tm" else [len(t) for t in towers]
        traffic = analytic_cross_host_traffic(
            "flat" if kind == "flat" else "sptt", topo, data.names, towers, k, DIM, BATCH
        )
        out[kind] = {
            "bytes": comm.cross_host_bytes,
            "msgs": comm.cross_host_msgs,
            "intra_bytes": comm.intra_host_bytes,
            "analytic": sum(b for b, _ in traffic),
            "analytic_msgs": sum(m for _, m in traffic),
        }
    return out


def _timing(rank: int, world: int, local_world: int, rounds: int, steps: int) -> dict:
    """Per step, this rank's barrier-to-barrier time and injected delay, every layout with and
    without the link, interleaved: round ``r`` rotates the layout order and flips link/no-link,
    so slow drifts of the machine's load fall on every cell alike."""
    import torch.distributed as dist

    from parallelism.dmt import SlowLink

    link = SlowLink(**LINK)
    built = {kind: _setup(rank, world, local_world, kind) for kind in KINDS}
    opts = {k: torch.optim.AdamW(v[3].parameters(), lr=1e-3) for k, v in built.items()}
    data = built["flat"][1]
    batches = [
        data.batch("train", i, world * BATCH).slice(rank * BATCH, (rank + 1) * BATCH)
        for i in range(8)
    ]
    out: dict[str, dict[str, list[float]]] = {
        f"{k}/{m}": {"step_s": [], "injected_s": [], "slept_s": []} for k in KINDS for m in MODES
    }

    def one(kind: str, mode: str, i: int) -> tuple[float, float, float]:
        model, comm = built[kind][3], built[kind][4]
        comm.link = link if mode == "slow_link" else None
        b = batches[i % len(batches)]
        dist.barrier()
        comm.reset()
        t0 = time.perf_counter()
        F.binary_cross_entropy_with_logits(model(b.dense, b.sparse), b.labels).backward()
        model.reduce_gradients()
        opts[kind].step()
        opts[kind].zero_grad()
        dist.barrier()
        return time.perf_counter() - t0, comm.injected_s, comm.slept_s

    for kind in KINDS:
        for mode in MODES:
            for i in range(WARMUP):
                one(kind, mode, i)
    for r in range(rounds):
        order = KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]
        for kind in order:
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                for i in range(steps):
                    cell = out[f"{kind}/{mode}"]
                    for name, v in zip(cell, one(kind, mode, r * steps + i)):
                        cell[name].append(v)
    return out


def _link_delay(per_rank: list[tuple[int, int]]) -> float:
    """The delay the link adds to a step: every rank sleeps its own, and the ranks are in step
    at every collective, so the step waits for the slowest rank's sum."""
    from parallelism.dmt import SlowLink

    link = SlowLink(**LINK)
    return max(link.delay(b, m) for b, m in per_rank)


def _timing_results(hosts: int, local: int) -> dict:
    from parallelism.dmt import analytic_cross_host_traffic
    from parallelism.topology import Topology
    from train.recsys_data import SyntheticClicks

    world = hosts * local
    per_rank = run_on_ranks(
        _timing, world, local, ROUNDS, STEPS, local_world_size=local, timeout_s=900
    )
    topo = Topology(world, local)
    data = SyntheticClicks(NUM_SPARSE, GROUPS, CARD, NUM_DENSE, seed=0)
    towers = [[f"f{i}" for i in g] for g in data.groups]
    rec: dict = {}
    for kind in KINDS:
        cell = {}
        for mode in MODES:
            key = f"{kind}/{mode}"
            # step i is the same collective-synchronised step on every rank: its time is the
            # slowest rank's; then the median over steps
            steps = list(zip(*(r[key]["step_s"] for r in per_rank)))
            inj = list(zip(*(r[key]["injected_s"] for r in per_rank)))
            slept = list(zip(*(r[key]["slept_s"] for r in per_rank)))
            cell[mode] = {
                "step_s": median([max(s) for s in steps]),
                "injected_s": median([max(s) for s in inj]),
                "slept_s": median([max(s) for s in slept]),
                "samples": len(steps),
            }
        k = [1] * len(towers) if kind == "sptt_tm" else [len(t) for t in towers]
        traffic = analytic_cross_host_traffic(
            "flat" if kind == "flat" else "sptt", topo, data.names, towers, k, DIM, BATCH
        )
        delay = _link_delay(traffic)
        # the closed form must be exactly what the link was asked to sleep
        assert abs(cell["slow_link"]["injected_s"] - delay) < 1e-9, (kind, cell, delay)
        rec[kind] = {
            "no_link_step_s": cell["no_link"]["step_s"],
            "slow_link_step_s": cell["slow_link"]["step_s"],
            "injected_s": cell["slow_link"]["injected_s"],
            "slept_s": cell["slow_link"]["slept_s"],
            "analytic_delay_s": delay,
            "cross_host_msgs_per_rank": max(m for _, m in traffic),
            "cross_host_bytes_per_rank": max(b for b, _ in traffic),
            "predicted_step_s": cell["no_link"]["step_s"] + delay,
            "samples": cell["slow_link"]["samples"],
        }
        v = rec[kind]
        v["measured_over_predicted"] = v["slow_link_step_s"] / v["predicted_step_s"]
        # the same with the time the ranks really slept (the OS wakes a sleeper late)
        v["measured_over_no_link_plus_slept"] = v["slow_link_step_s"] / (
            v["no_link_step_s"] + v["slept_s"]
        )
    for kind in KINDS:
        v, f = rec[kind], rec["flat"]
        v["speedup_vs_flat"] = f["slow_link_step_s"] / v["slow_link_step_s"]
        v["predicted_speedup_vs_flat"] = f["predicted_step_s"] / v["predicted_step_s"]
        v["speedup_measured_over_predicted"] = v["speedup_vs_flat"] / v["predicted_speedup_vs_flat"]
        v["link_bound_speedup"] = f["analytic_delay_s"] / v["analytic_delay_s"]
        v["byte_ratio_vs_flat"] = f["cross_host_bytes_per_rank"] / v["cross_host_bytes_per_rank"]
    return rec


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {
            "num_sparse": NUM_SPARSE,
            "dim": DIM,
            "num_towers": GROUPS,
            "tower_out": 1,
            "batch_per_rank": BATCH,
            "link": LINK,
            "rounds": ROUNDS,
            "steps_per_round": STEPS,
            "timing_topologies": [list(t) for t in TIMING_TOPOLOGIES],
            "device": "CPU, gloo, ranks as processes on one 2-core machine (no GPU)",
        },
        "machine": machine(),
        "bytes": {},
        "timing": {},
    }
    for hosts, local in ((2, 2), (2, 4)):
        per_rank = run_on_ranks(_bytes, hosts * local, local, local_world_size=local, timeout_s=120)
        rec = {}
        for kind in KINDS:
            rec[kind] = {
                "cross_host_bytes": sum(r[kind]["bytes"] for r in per_rank),
                "analytic_bytes": per_rank[0][kind]["analytic"],
                "cross_host_msgs": sum(r[kind]["msgs"] for r in per_rank),
                "analytic_msgs": per_rank[0][kind]["analytic_msgs"],
                "intra_host_bytes": sum(r[kind]["intra_bytes"] for r in per_rank),
            }
        for kind in KINDS:
            rec[kind]["ratio_vs_flat"] = (
                rec["flat"]["cross_host_bytes"] / rec[kind]["cross_host_bytes"]
            )
            rec[kind]["analytic_ratio_vs_flat"] = (
                rec["flat"]["analytic_bytes"] / rec[kind]["analytic_bytes"]
            )
        result["bytes"][f"{hosts}x{local}"] = rec
        print(f"{hosts}x{local}", json.dumps(rec), flush=True)
    for hosts, local in TIMING_TOPOLOGIES:
        rec = _timing_results(hosts, local)
        result["timing"][f"{hosts}x{local}"] = rec
        print(f"timing {hosts}x{local}", json.dumps(rec), flush=True)
    (OUT / "dmt.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "dmt.md").write_text(_markdown(result))
    print((OUT / "dmt.md").read_text())


def _markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        "# DMT: cross-host traffic and step time (flat TW vs SPTT vs SPTT + tower modules)",
        "",
        f"Setup: {c['num_sparse']} sparse features, dim {c['dim']}, {c['num_towers']} towers of "
        f"4, 1 embedding out of each tower module, {c['batch_per_rank']} samples per rank. "
        f"{c['device']}. Bytes = one forward + backward, summed over ranks, counted inside the "
        "all-to-alls; a message = one (all-to-all, remote peer) pair with a payload.",
        "",
        "| topology | layout | cross-host bytes | analytic | flat / this (measured) | "
        "flat / this (analytic) | cross-host messages | analytic | intra-host bytes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for topo, rec in r["bytes"].items():
        for kind, v in rec.items():
            lines.append(
                f"| {topo} | {kind} | {v['cross_host_bytes']} | {v['analytic_bytes']} | "
                f"{v['ratio_vs_flat']:.3f} | {v['analytic_ratio_vs_flat']:.3f} | "
                f"{v['cross_host_msgs']} | {v['analytic_msgs']} | {v['intra_host_bytes']} |"
            )
    link = c["link"]
    lines += [
        "",
        f"Simulated slow inter-host link: after each all-to-all the sender sleeps "
        f"{link['latency_s'] * 1e3:g} ms per remote peer it sent to + remote bytes / "
        f"{link['bytes_per_s'] / 1e6:g} MB/s. One run per topology: {c['rounds']} rounds, each "
        f"running every layout with and without the link ({c['steps_per_round']} steps per "
        "cell), the layout order rotated and link/no-link flipped every round. Step time = the "
        "slowest rank's barrier-to-barrier time; median over steps. Predicted = no-link median + "
        "the analytic link delay (messages x latency + bytes / bandwidth, slowest rank); "
        "slept = what the ranks really slept (the analytic delay plus the OS's wake-up "
        "lateness); link-bound = the speedup if the link were all of the step.",
        "",
        "| topology | layout | no link s | slow link s | analytic delay s | slept s | "
        "predicted s | measured / predicted | measured / (no link + slept) | speedup vs flat | "
        "predicted speedup | measured / predicted speedup | link-bound speedup | byte ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for topo, rec in r["timing"].items():
        for kind, v in rec.items():
            lines.append(
                f"| {topo} | {kind} | {v['no_link_step_s']:.4f} | {v['slow_link_step_s']:.4f} | "
                f"{v['analytic_delay_s']:.4f} | {v['slept_s']:.4f} | "
                f"{v['predicted_step_s']:.4f} | {v['measured_over_predicted']:.3f} | "
                f"{v['measured_over_no_link_plus_slept']:.3f} | "
                f"{v['speedup_vs_flat']:.3f} | {v['predicted_speedup_vs_flat']:.3f} | "
                f"{v['speedup_measured_over_predicted']:.3f} | {v['link_bound_speedup']:.2f} | "
                f"{v['byte_ratio_vs_flat']:.2f} |"
            )
    m = r["machine"]
    lines += ["", f"Machine: {m['cpu_count']} CPUs, torch {m['torch']}, GPU: {m['gpu'] or 'none'}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
