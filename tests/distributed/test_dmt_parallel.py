"""SPTT and flat table-wise sharding equal the single-process model (Must-show 1) and their
cross-host bytes, counted at the collectives, equal the analytic count (Must-show 2)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.harness import run_on_ranks

NUM_SPARSE, NUM_DENSE, DIM, CARD, B = 8, 4, 8, 16, 4


def _jagged_batch(world: int, seed: int):
    """A global batch whose bags have 0, 1 or 2 ids (exercises the jagged path)."""
    from torchrec import KeyedJaggedTensor

    from train.recsys_data import feature_names

    g = torch.Generator().manual_seed(seed)
    n = world * B
    lengths = torch.randint(0, 3, (NUM_SPARSE * n,), generator=g)
    values = torch.randint(0, CARD, (int(lengths.sum()),), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=feature_names(NUM_SPARSE), values=values, lengths=lengths
    )
    dense = torch.randn(n, NUM_DENSE, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g).float()
    from train.recsys_data import RecBatch

    return RecBatch(dense, kjt, labels)


def _plain(kind: str, towers: list[list[str]]):
    from models.dlrm import DLRM
    from models.dmt import DMT
    from parallelism.init import materialize_and_init_

    with torch.device("meta"):
        if kind == "flat":
            m = DLRM(NUM_DENSE, NUM_SPARSE, DIM, CARD, (16,), (16, 8))
        else:
            m = DMT(NUM_DENSE, towers, DIM, CARD, 1 if kind == "sptt_tm" else 0, (16,), (16, 8))
    materialize_and_init_(m, seed=3)
    return m


def _torchrec_tw_err(world: int, plain, mine) -> float:
    """TorchRec's own table-wise sharding (DistributedModelParallel, gloo, fused CPU kernel) of
    the same tables: its pooled embeddings must equal the plain lookup that our flat TW is
    checked against (forward only: the fused kernel updates weights inside backward)."""
    import torch.distributed as dist
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner import Topology as TorchRecTopology
    from torchrec.distributed.planner.types import ParameterConstraints

    ebc = copy.deepcopy(plain.sparse_arch.embedding_bag_collection)
    cons = {
        c.name: ParameterConstraints(sharding_types=["table_wise"])
        for c in ebc.embedding_bag_configs()
    }
    planner = EmbeddingShardingPlanner(
        topology=TorchRecTopology(world_size=world, compute_device="cpu", local_world_size=2),
        constraints=cons,
    )
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(ebc, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        ebc, device=torch.device("cpu"), plan=plan, sharders=sharders, init_data_parallel=False
    )
    full = plain.sparse_arch.embedding_bag_collection.state_dict()
    with torch.no_grad():
        for k, st in dmp.state_dict().items():
            for sh in st.local_shards():
                r, c = sh.metadata.shard_offsets
                h, w = sh.tensor.shape
                sh.tensor.copy_(full[k][r : r + h, c : c + w])
    out = dmp(mine.sparse)
    out = out.wait() if hasattr(out, "wait") else out
    got, ref = out.to_dict(), plain.sparse_arch.embedding_bag_collection(mine.sparse).to_dict()
    assert sorted(got) == sorted(ref)
    return max((got[k] - ref[k]).abs().max().item() for k in ref)


def _cross_host_counts(kind, model, comm, data, towers, topo, rank: int) -> dict:
    """One forward + backward on a batch with one id per feature (the closed form's
    assumption): this rank's counted cross-host bytes and messages, and the analytic ones."""
    from parallelism.dmt import analytic_cross_host_traffic

    comm.reset()
    n = topo.world_size * B
    std = data.batch("train", 0, n).slice(rank * B, (rank + 1) * B)
    F.binary_cross_entropy_with_logits(model(std.dense, std.sparse), std.labels).backward()
    k = [1] * len(towers) if kind == "sptt_tm" else [len(t) for t in towers]
    traffic = analytic_cross_host_traffic(
        "flat" if kind == "flat" else "sptt", topo, data.names, towers, k, DIM, B
    )
    return {
        "bytes": comm.cross_host_bytes,
        "msgs": comm.cross_host_msgs,
        "analytic": sum(b for b, _ in traffic),
        "analytic_rank": traffic[rank],
    }


def _layouts(rank: int, world: int, local_world: int) -> dict:
    from parallelism.dmt import Comm, ShardedDLRM, ShardedDMT
    from parallelism.topology import Topology, build_host_groups
    from train.recsys_data import SyntheticClicks

    topo = Topology(world, local_world)
    groups = build_host_groups(topo, rank)
    data = SyntheticClicks(NUM_SPARSE, 4, CARD, NUM_DENSE, seed=1)
    towers = [[f"f{i}" for i in grp] for grp in data.groups]
    out = {}
    for kind in ("flat", "sptt", "sptt_tm"):
        plain = _plain(kind, towers)
        ref = copy.deepcopy(plain)
        comm = Comm(topo, rank)
        cls = ShardedDLRM if kind == "flat" else ShardedDMT
        model = cls(copy.deepcopy(plain), topo, groups, comm, rank)
        batch = _jagged_batch(world, seed=11)
        mine = batch.slice(rank * B, (rank + 1) * B)
        n = world * B
        ref_logits = ref(batch.dense, batch.sparse)
        F.binary_cross_entropy_with_logits(ref_logits, batch.labels, reduction="sum").div(
            n
        ).backward()
        logits = model(mine.dense, mine.sparse)
        F.binary_cross_entropy_with_logits(logits, mine.labels, reduction="sum").div(n).backward()
        model.reduce_gradients()
        ref_p = dict(ref.named_parameters())
        grad_err = max(
            (p.grad - ref_p[model.plain_name(name)].grad).abs().max().item()
            for name, p in model.named_parameters()
        )
        n_local = sum(1 for _ in model.named_parameters())
        # one AdamW step on both: updated weights must agree too
        for m in (ref, model):
            torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.0).step()
        weight_err = max(
            (p - ref_p[model.plain_name(name)]).abs().max().item()
            for name, p in model.named_parameters()
        )
        out[kind] = {
            "logit_err": (logits - ref_logits[rank * B : (rank + 1) * B]).abs().max().item(),
            "grad_err": grad_err,
            "weight_err": weight_err,
            "n_local_params": n_local,
            "torchrec_tw_err": _torchrec_tw_err(world, plain, mine) if kind == "flat" else 0.0,
            **_cross_host_counts(kind, model, comm, data, towers, topo, rank),
        }
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_sptt_and_flat_tw_equal_single_process_2x2() -> None:
    results = run_on_ranks(_layouts, 4, 2, local_world_size=2, timeout_s=90)
    for kind in ("flat", "sptt", "sptt_tm"):
        for r in results:
            assert r[kind]["n_local_params"] > 0
            assert r[kind]["torchrec_tw_err"] <= 1e-6, (kind, r[kind])
            assert r[kind]["logit_err"] <= 1e-6, (kind, r[kind])
            assert r[kind]["grad_err"] <= 1e-6, (kind, r[kind])
            assert r[kind]["weight_err"] <= 1e-6, (kind, r[kind])
        _assert_counts_match(results, kind)
    flat = sum(r["flat"]["bytes"] for r in results)
    tm = sum(r["sptt_tm"]["bytes"] for r in results)
    assert tm < flat  # tower modules compress what crosses hosts


def _assert_counts_match(results: list[dict], kind: str) -> None:
    measured = sum(r[kind]["bytes"] for r in results)
    assert measured == results[0][kind]["analytic"], (kind, measured)
    for r in results:  # per rank, bytes and messages (what the slow link charges)
        assert (r[kind]["bytes"], r[kind]["msgs"]) == tuple(r[kind]["analytic_rank"]), (kind, r)


def _counts_only(rank: int, world: int, local_world: int) -> dict:
    from parallelism.dmt import Comm, ShardedDLRM, ShardedDMT
    from parallelism.topology import Topology, build_host_groups
    from train.recsys_data import SyntheticClicks

    topo = Topology(world, local_world)
    groups = build_host_groups(topo, rank)
    data = SyntheticClicks(NUM_SPARSE, 4, CARD, NUM_DENSE, seed=1)
    towers = [[f"f{i}" for i in grp] for grp in data.groups]
    out = {}
    for kind in ("flat", "sptt", "sptt_tm"):
        comm = Comm(topo, rank)
        cls = ShardedDLRM if kind == "flat" else ShardedDMT
        model = cls(_plain(kind, towers), topo, groups, comm, rank)
        out[kind] = _cross_host_counts(kind, model, comm, data, towers, topo, rank)
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_cross_host_bytes_equal_analytic_2x4() -> None:
    """Must-show 2 at 2 hosts x 4 local ranks (8 gloo ranks): bytes and messages counted at the
    collectives equal the closed form for flat TW, SPTT and SPTT + tower modules."""
    results = run_on_ranks(_counts_only, 8, 4, local_world_size=4, timeout_s=120)
    for kind in ("flat", "sptt", "sptt_tm"):
        _assert_counts_match(results, kind)
    total = {k: sum(r[k]["bytes"] for r in results) for k in ("flat", "sptt", "sptt_tm")}
    msgs = {k: sum(r[k]["msgs"] for r in results) for k in ("flat", "sptt", "sptt_tm")}
    assert total["sptt"] == total["flat"] and msgs["sptt"] * 4 == msgs["flat"]  # (W-L)/(H-1)
    assert total["sptt_tm"] < total["flat"]
