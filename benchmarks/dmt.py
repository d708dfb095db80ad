"""DMT benchmark: cross-host bytes and step time, flat table-wise vs SPTT vs SPTT + tower modules.

    python -m benchmarks.dmt            # writes benchmarks/results/dmt.json and dmt.md

Part 1 (bytes). On simulated topologies 2 hosts x 2 and 2 hosts x 4 local ranks (gloo ranks on
this machine, LOCAL_WORLD_SIZE set per rank), one training step (forward + backward) of each
layout; the bytes each rank sends to ranks on other hosts are counted inside the all-to-alls
(``parallelism/dmt.py: Comm``) and compared with the closed-form count
(``analytic_cross_host_bytes``).

Part 2 (slow link). Every rank sleeps, after each all-to-all, ``peers x latency + remote bytes /
bandwidth`` (``SlowLink``): a simulated inter-host link. Step times (median of ``REPEATS``) of
each layout with and without the link; the predicted time is the no-link time plus the injected
delay, and the predicted speedup of DMT over flat follows from the byte (and message) counts.
The peer layout is flat table-wise sharding (TorchRec's TW placement, through the same counted
all-to-alls so that bytes are comparable). No GPU in this environment: these are CPU/gloo
figures of a simulated link, not of a real network.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.distributed.harness import run_on_ranks

NUM_SPARSE, NUM_DENSE, GROUPS, CARD, DIM, BATCH = 16, 4, 4, 32, 16, 64
KINDS = ("flat", "sptt", "sptt_tm")
LINK = {"latency_s": 5e-3, "bytes_per_s": 1e6}
REPEATS, WARMUP = 15, 3
OUT = Path(__file__).resolve().parent / "results"


def _setup(rank: int, world: int, local_world: int, kind: str, link: dict | None):
    from models.dlrm import DLRM
    from models.dmt import DMT
    from parallelism.dmt import Comm, ShardedDLRM, ShardedDMT, SlowLink
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
    comm = Comm(topo, rank, SlowLink(**link) if link else None)
    cls = ShardedDLRM if kind == "flat" else ShardedDMT
    model = cls(copy.deepcopy(plain), topo, groups, comm, rank)
    return topo, data, towers, model, comm


def _bytes(rank: int, world: int, local_world: int) -> dict:
    from parallelism.dmt import analytic_cross_host_bytes

    out = {}
    for kind in KINDS:
        topo, data, towers, model, comm = _setup(rank, world, local_world, kind, None)
        b = data.batch("train", 0, world * BATCH).slice(rank * BATCH, (rank + 1) * BATCH)
        F.binary_cross_entropy_with_logits(model(b.dense, b.sparse), b.labels).backward()
        k = [1] * len(towers) if kind == "sptt_tm" else [len(t) for t in towers]
        out[kind] = {
            "bytes": comm.cross_host_bytes,
            "msgs": comm.cross_host_msgs,
            "intra_bytes": comm.intra_host_bytes,
            "analytic": analytic_cross_host_bytes(
                "flat" if kind == "flat" else "sptt", topo, data.names, towers, k, DIM, BATCH
            ),
        }
    return out


def _timing(rank: int, world: int, local_world: int, link: dict | None) -> dict:
    import torch.distributed as dist

    out = {}
    for kind in KINDS:
        _, data, _, model, comm = _setup(rank, world, local_world, kind, link)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times, delays = [], []
        for step in range(WARMUP + REPEATS):
            b = data.batch("train", step, world * BATCH).slice(rank * BATCH, (rank + 1) * BATCH)
            dist.barrier()
            comm.reset()
            t0 = time.perf_counter()
            F.binary_cross_entropy_with_logits(model(b.dense, b.sparse), b.labels).backward()
            model.reduce_gradients()
            opt.step()
            opt.zero_grad()
            dist.barrier()
            if step >= WARMUP:
                times.append(time.perf_counter() - t0)
                delays.append(comm.injected_s)
        out[kind] = {"step_s": statistics.median(times), "injected_s": statistics.median(delays)}
    return out


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
            "repeats": REPEATS,
            "device": "CPU, gloo, ranks as processes on one 2-core machine (no GPU)",
        },
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
    for name, link in (("no_link", None), ("slow_link", LINK)):
        per_rank = run_on_ranks(_timing, 4, 2, link, local_world_size=2, timeout_s=240)
        result["timing"][name] = {
            kind: {
                "step_s": max(r[kind]["step_s"] for r in per_rank),
                "injected_s": max(r[kind]["injected_s"] for r in per_rank),
            }
            for kind in KINDS
        }
        print(name, json.dumps(result["timing"][name]), flush=True)
    base, slow = result["timing"]["no_link"], result["timing"]["slow_link"]
    for kind in KINDS:
        slow[kind]["predicted_step_s"] = base[kind]["step_s"] + slow[kind]["injected_s"]
    for kind in ("sptt", "sptt_tm"):
        slow[kind]["speedup_vs_flat"] = slow["flat"]["step_s"] / slow[kind]["step_s"]
        slow[kind]["predicted_speedup_vs_flat"] = (
            slow["flat"]["predicted_step_s"] / slow[kind]["predicted_step_s"]
        )
    (OUT / "dmt.json").write_text(json.dumps(result, indent=2))
    (OUT / "dmt.md").write_text(_markdown(result))
    print((OUT / "dmt.md").read_text())


def _markdown(r: dict) -> str:
    lines = [
        "# DMT: cross-host traffic and step time (flat TW vs SPTT vs SPTT + tower modules)",
        "",
        f"Setup: {r['config']['num_sparse']} sparse features, dim {r['config']['dim']}, "
        f"{r['config']['num_towers']} towers of 4, 1 embedding out of each tower module, "
        f"{r['config']['batch_per_rank']} samples per rank. {r['config']['device']}. "
        "Bytes = one forward + backward, summed over ranks, counted inside the all-to-alls.",
        "",
        "| topology | layout | cross-host bytes | analytic | flat / this (measured) | "
        "flat / this (analytic) | cross-host messages | intra-host bytes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for topo, rec in r["bytes"].items():
        for kind, v in rec.items():
            lines.append(
                f"| {topo} | {kind} | {v['cross_host_bytes']} | {v['analytic_bytes']} | "
                f"{v['ratio_vs_flat']:.3f} | {v['analytic_ratio_vs_flat']:.3f} | "
                f"{v['cross_host_msgs']} | {v['intra_host_bytes']} |"
            )
    link = r["config"]["link"]
    lines += [
        "",
        f"Simulated slow inter-host link (2x2): {link['latency_s'] * 1e3:g} ms per remote peer "
        f"per all-to-all + bytes / {link['bytes_per_s'] / 1e6:g} MB/s, slept by the sender. "
        f"Median of {r['config']['repeats']} steps (slowest rank).",
        "",
        "| layout | step (no link) s | step (slow link) s | injected s | predicted s | "
        "speedup vs flat | predicted speedup |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base, slow = r["timing"]["no_link"], r["timing"]["slow_link"]
    for kind in KINDS:
        s = slow[kind]
        lines.append(
            f"| {kind} | {base[kind]['step_s']:.4f} | {s['step_s']:.4f} | {s['injected_s']:.4f} "
            f"| {s['predicted_step_s']:.4f} | {s.get('speedup_vs_flat', 1.0):.2f} | "
            f"{s.get('predicted_speedup_vs_flat', 1.0):.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
