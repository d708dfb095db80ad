"""Sharding for the recommender models: flat table-wise (DLRM) and DMT's Semantic-preserving
Tower Transform (SPTT), with every embedding collective counted.

Flat table-wise (``ShardedDLRM``): every table lives on one rank of the world; each rank sends
the ids of a table to its owner (one all-to-all over all ranks), the owner looks them up and
sends the pooled embeddings back (a second, differentiable all-to-all). This is TorchRec's TW
sharding; a fraction (H-1)/H of both all-to-alls crosses hosts.

SPTT (``ShardedDMT``, Luo et al., MLSys 2024, sec. 3.1): each tower's tables live on one host,
table-wise sharded over that host's ranks. A step is

1. cross-host id all-to-all among peers (same local rank): rank (h', l) sends the ids of the
   towers on host h to rank (h, l) only;
2. intra-host table-wise lookup of those ids (id all-to-all, lookup, pooled all-to-all back);
3. the tower modules of host h on the H x B samples now held by (h, l);
4. cross-host all-to-all among peers returning each sample's (compressed) tower outputs;
5. global interaction + over arch on every rank for its own B samples.

Gradients: tables are owned by one rank (no reduction); tower modules are replicated over their
host's ranks (sum over the intra-host group); dense and over arch are replicated everywhere (sum
over the world). With the loss summed over samples and divided by the global batch this equals
the single-process model on the global batch (``tests/distributed/test_dmt_parallel.py``).

Why written here, not TorchRec's sharders: TorchRec's tower sharding (``EmbeddingTowerCollection``
/ ``TowerSharding``) only runs on CUDA, DistributedModelParallel has no way to send ids across
hosts and run a tower module between two all-to-alls, and its collectives mix c10d and
functional calls, so there is no single seam at which to count cross-host bytes. We keep
TorchRec's modules (EmbeddingBagCollection lookup, KeyedJaggedTensor inputs, the DLRM arches)
and write the placement and the all-to-alls. ``Comm`` counts the bytes each rank sends to ranks
on other hosts, in forward and backward, and can inject the delay of a slow inter-host link.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from models.dlrm import DLRM, table_configs
from models.dmt import DMT
from parallelism.init import param_generator
from parallelism.topology import HostGroups, Topology

LENGTH_DTYPE = torch.int32
"""Bag lengths travel as int32 (ids as int64, embeddings as fp32)."""
_EMPTY = torch.zeros(0, dtype=torch.long)


# -- byte counting and the simulated slow link ------------------------------------------------
@dataclass
class SlowLink:
    """A simulated inter-host link: each collective that sends ``n`` bytes to ``m`` remote peers
    costs ``m * latency_s + n / bytes_per_s`` extra seconds on the sending rank."""

    latency_s: float = 0.0
    bytes_per_s: float = float("inf")

    def delay(self, nbytes: int, peers: int) -> float:
        return peers * self.latency_s + nbytes / self.bytes_per_s


@dataclass
class Comm:
    """All-to-alls over one group, counting what this rank sends to other hosts."""

    topo: Topology
    rank: int
    link: SlowLink | None = None
    cross_host_bytes: int = 0
    cross_host_msgs: int = 0
    intra_host_bytes: int = 0
    injected_s: float = 0.0
    """Delay the link asked for (``SlowLink.delay`` summed over collectives)."""
    slept_s: float = 0.0
    """Delay actually spent sleeping (``injected_s`` plus the OS's wake-up lateness)."""

    def reset(self) -> None:
        self.cross_host_bytes = self.cross_host_msgs = self.intra_host_bytes = 0
        self.injected_s = self.slept_s = 0.0

    def _account(self, ranks: list[int], send_bytes: list[int]) -> None:
        remote, peers = 0, 0
        for r, nb in zip(ranks, send_bytes):
            if r == self.rank:
                continue
            if self.topo.host(r) != self.topo.host(self.rank):
                remote += nb
                peers += nb > 0
            else:
                self.intra_host_bytes += nb
        self.cross_host_bytes += remote
        self.cross_host_msgs += peers
        if self.link is not None and remote:
            d = self.link.delay(remote, peers)
            self.injected_s += d
            t0 = time.perf_counter()
            time.sleep(d)
            self.slept_s += time.perf_counter() - t0

    def all_to_all(
        self,
        x: torch.Tensor,
        send: list[int],
        recv: list[int],
        group: dist.ProcessGroup,
        ranks: list[int],
    ) -> torch.Tensor:
        """Non-differentiable all-to-all of a 1-D tensor with element splits."""
        out = x.new_empty(sum(recv))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        self._account(ranks, [n * x.element_size() for n in send])
        return out

    def all_to_all_grad(
        self,
        x: torch.Tensor,
        send: list[int],
        recv: list[int],
        group: dist.ProcessGroup,
        ranks: list[int],
    ) -> torch.Tensor:
        """Differentiable all-to-all of a 1-D tensor (backward: the reverse all-to-all)."""
        return _AllToAll.apply(x, send, recv, group, ranks, self)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, group, ranks, comm):  # type: ignore[override]
        ctx.args = (send, recv, group, ranks, comm)
        return comm.all_to_all(x, send, recv, group, ranks)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        send, recv, group, ranks, comm = ctx.args
        return (
            comm.all_to_all(grad.contiguous(), recv, send, group, ranks),
            None,
            None,
            None,
            None,
            None,
        )


# -- placement ---------------------------------------------------------------------------------
def balance(costs: list[float], bins: int) -> list[int]:
    """Longest-processing-time greedy: item i -> bin (heaviest items first, to the lightest bin;
    ties to the lowest bin)."""
    load = [0.0] * bins
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(bins), key=lambda b: (load[b], b))
        out[i] = b
        load[b] += costs[i]
    return out


@dataclass
class Placement:
    """Where towers and tables live: ``tower_host[t]`` and ``owner[feature]`` (a global rank)."""

    tower_host: list[int]
    owner: dict[str, int]


def place_towers(towers: list[list[str]], topo: Topology, dim: int) -> Placement:
    """Towers to hosts (balanced by lookups x dim), then each host's tables over its ranks."""
    t_cost = [float(len(t) * dim) for t in towers]
    tower_host = balance(t_cost, topo.hosts)
    owner: dict[str, int] = {}
    for h in range(topo.hosts):
        feats = [f for t, names in enumerate(towers) if tower_host[t] == h for f in names]
        local = balance([float(dim)] * len(feats), topo.local_world_size)
        for f, lr in zip(feats, local):
            owner[f] = h * topo.local_world_size + lr
    return Placement(tower_host, owner)


def place_tables_flat(names: list[str], topo: Topology, dim: int) -> dict[str, int]:
    """Flat table-wise: every table to one rank of the world, balanced."""
    return dict(zip(names, balance([float(dim)] * len(names), topo.world_size)))


# -- the table-wise lookup over one group -------------------------------------------------------
def _split_kjt(sparse: KeyedJaggedTensor) -> tuple[dict, dict, int]:
    """KJT -> per-feature lengths [B] and values."""
    b = sparse.stride()
    keys = sparse.keys()
    lengths = sparse.lengths().view(len(keys), b)
    per_key = torch.split(sparse.values(), lengths.sum(1).tolist())
    return (
        {k: lengths[i] for i, k in enumerate(keys)},
        {k: per_key[i] for i, k in enumerate(keys)},
        b,
    )


def table_wise_lookup(
    lengths: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    bsz: int,
    owned: list[list[str]],
    me: int,
    ebc: EmbeddingBagCollection | None,
    dim: int,
    dummy: torch.Tensor,
    comm: Comm,
    group: dist.ProcessGroup,
    ranks: list[int],
) -> dict[str, torch.Tensor]:
    """Pooled embeddings of every feature in ``owned`` (tables owned by the group's members).

    Args:
        lengths / values: per feature served by this group, bag lengths [bsz] and ids.
        owned: ``owned[i]`` = features whose table group member ``i`` holds (in its EBC order).
        me: this rank's index in the group; ``ebc`` holds the tables of ``owned[me]``.
        dim: embedding dimension D.
        dummy: an empty leaf that requires grad, so every rank joins the backward all-to-all
            even if it owns no table.

    Returns:
        feature -> [bsz, D] pooled embedding, differentiable w.r.t. the owners' tables.

    Over 60 lines on purpose: the three collectives share the split sizes computed between
    them (lengths -> value counts -> embedding counts); apart, each would recompute them.
    """
    n = len(owned)
    # ids to owners: lengths first (sizes known), then values (sizes from the lengths)
    send_len = torch.cat(
        [torch.cat([lengths[f] for f in owned[j]]) if owned[j] else _EMPTY for j in range(n)]
    ).to(LENGTH_DTYPE)
    n_me = len(owned[me])
    rlen = comm.all_to_all(
        send_len, [len(owned[j]) * bsz for j in range(n)], [n_me * bsz] * n, group, ranks
    ).view(n, n_me, bsz)
    send_val = [torch.cat([values[f] for f in owned[j]]) if owned[j] else _EMPTY for j in range(n)]
    rvals = comm.all_to_all(
        torch.cat(send_val),
        [v.numel() for v in send_val],
        rlen.sum((1, 2)).tolist(),
        group,
        ranks,
    )
    # lookup: key-major KJT over (group member, sample) for my tables
    if n_me:
        src_chunks = torch.split(rvals, rlen.sum((1, 2)).tolist())
        per_src_feat = [torch.split(c, rlen[i].sum(1).tolist()) for i, c in enumerate(src_chunks)]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=owned[me],
            values=torch.cat([per_src_feat[i][q] for q in range(n_me) for i in range(n)]),
            lengths=rlen.permute(1, 0, 2).reshape(-1).long(),
        )
        pooled = ebc(kjt).to_dict()
        out_GBFD = torch.stack([pooled[f] for f in owned[me]], dim=1)  # [n*bsz, n_me, D]
        send_emb = out_GBFD.flatten()
    else:
        send_emb = dummy
    recv = comm.all_to_all_grad(
        send_emb,
        [bsz * n_me * dim] * n,
        [bsz * len(owned[j]) * dim for j in range(n)],
        group,
        ranks,
    )
    chunks = torch.split(recv, [bsz * len(owned[j]) * dim for j in range(n)])
    result: dict[str, torch.Tensor] = {}
    for j in range(n):
        emb = chunks[j].view(bsz, len(owned[j]), dim)
        for q, f in enumerate(owned[j]):
            result[f] = emb[:, q]
    return result


# -- sharded models ------------------------------------------------------------------------------
def _local_ebc(names: list[str], dim: int, num_embeddings: int) -> EmbeddingBagCollection | None:
    if not names:
        return None
    return EmbeddingBagCollection(
        tables=table_configs(names, dim, num_embeddings), device=torch.get_default_device()
    )


class _ShardedBase(nn.Module):
    """Shared by both layouts: the parameter-name map, seeded init and gradient reduction."""

    plain_names: dict[str, str]
    groups: HostGroups
    comm: Comm

    def plain_name(self, name: str) -> str:
        """This module's parameter name -> the plain (single-process) model's name."""
        return self.plain_names.get(name, name)

    def _grad_groups(self) -> list[tuple[list[nn.Parameter], dist.ProcessGroup | None]]:
        raise NotImplementedError

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Sum replicated parameters' gradients over the ranks that hold a copy."""
        for params, group in self._grad_groups():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if not grads:
                continue
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=group)
            for p, g in zip(params, torch.split(flat, [g.numel() for g in grads])):
                p.grad = g.view_as(p).clone()

    def _norm_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(parameters whose squared norms are summed over the world: each is counted on one
        rank only, parameters replicated on every rank)."""
        raise NotImplementedError

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient L2 norm, each parameter counted once (tables on their owner, tower
        modules on their host's first rank, dense parts everywhere), then clip to ``max_norm``
        (no clipping when <= 0). Call after ``reduce_gradients``; identical on every rank."""
        unique, replicated = self._norm_groups()

        def sq(params: list[nn.Parameter]) -> torch.Tensor:
            grads = [p.grad.float() for p in params if p.grad is not None]
            if not grads:
                return torch.zeros((), dtype=torch.float32)
            return torch.stack(torch._foreach_norm(grads)).square().sum()

        total_sq = sq(unique)
        dist.all_reduce(total_sq, group=self.groups.world)
        total = (total_sq + sq(replicated)).sqrt()
        if max_norm > 0 and torch.isfinite(total):
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coef)
        return total

    @torch.no_grad()
    def init_weights_(self, init_fn, seed: int, device: torch.device | str = "cpu") -> None:
        """Materialise (from meta) and fill every parameter from the plain model's seeded init,
        keyed by its plain name, so every layout starts from the same weights."""
        self.to_empty(device=device)
        for name, p in self.named_parameters():
            plain = self.plain_name(name)
            p.copy_(init_fn(plain, tuple(p.shape), param_generator(seed, plain)))


def _num_embeddings(ebc: EmbeddingBagCollection) -> int:
    return ebc.embedding_bag_configs()[0].num_embeddings


class ShardedDLRM(_ShardedBase):
    """Flat table-wise DLRM: tables spread over all ranks, one world all-to-all each way.

    Args:
        model: the plain ``DLRM`` (on meta or materialised; its arches are reused as they are).
        topo: hosts x local ranks.
        groups: this rank's process groups.
        comm: the byte-counting all-to-all.
        rank: this rank.
    """

    def __init__(
        self, model: DLRM, topo: Topology, groups: HostGroups, comm: Comm, rank: int
    ) -> None:
        super().__init__()
        self.names, self.dim, self.rank = model.names, model.dim, rank
        self.groups, self.comm = groups, comm
        src = model.sparse_arch.embedding_bag_collection
        self.owner = place_tables_flat(self.names, topo, self.dim)
        self.owned = [[f for f in self.names if self.owner[f] == r] for r in range(topo.world_size)]
        self.local_ebc = _local_ebc(self.owned[rank], self.dim, _num_embeddings(src))
        self.plain_names = {}
        for f in self.owned[rank]:
            w = f"embedding_bags.t_{f}.weight"
            self.plain_names[f"local_ebc.{w}"] = f"sparse_arch.embedding_bag_collection.{w}"
            if src.embedding_bags[f"t_{f}"].weight.device.type != "meta":
                self.local_ebc.embedding_bags[f"t_{f}"].weight = src.embedding_bags[f"t_{f}"].weight
        self.dense_arch, self.inter_arch, self.over_arch = (
            model.dense_arch,
            model.inter_arch,
            model.over_arch,
        )

    def forward(self, dense_BDn: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """This rank's samples: dense [B, Dn], KJT (batch B) -> logits [B]."""
        lengths, values, b = _split_kjt(sparse)
        emb = table_wise_lookup(
            lengths,
            values,
            b,
            self.owned,
            self.rank,
            self.local_ebc,
            self.dim,
            torch.zeros(0, requires_grad=True),
            self.comm,
            self.groups.world,
            self.groups.world_ranks,
        )
        return DLRM.head(self, dense_BDn, torch.stack([emb[f] for f in self.names], dim=1))

    def _grad_groups(self):
        dense = [*self.dense_arch.parameters(), *self.over_arch.parameters()]
        return [(dense, self.groups.world)]

    def _norm_groups(self):
        tables = list(self.local_ebc.parameters()) if self.local_ebc is not None else []
        return tables, [*self.dense_arch.parameters(), *self.over_arch.parameters()]


class ShardedDMT(_ShardedBase):
    """DMT under SPTT: towers on hosts, tables table-wise inside the host (module docstring).

    Args:
        model: the plain ``DMT`` (on meta or materialised).
        topo: hosts x local ranks.
        groups: this rank's process groups.
        comm: the byte-counting all-to-all.
        rank: this rank.
    """

    def __init__(
        self, model: DMT, topo: Topology, groups: HostGroups, comm: Comm, rank: int
    ) -> None:
        super().__init__()
        self.topo, self.groups, self.comm, self.rank = topo, groups, comm, rank
        self.dim = model.dim
        self.tower_names = [t.names for t in model.towers.values()]
        self.tower_k = [t.num_out for t in model.towers.values()]
        self.placement = place_towers(self.tower_names, topo, self.dim)
        h, lr, L = topo.host(rank), topo.local(rank), topo.local_world_size
        self.host = h
        self.host_towers = [
            [t for t in range(len(self.tower_names)) if self.placement.tower_host[t] == hh]
            for hh in range(topo.hosts)
        ]
        self.host_feats = [[f for t in ts for f in self.tower_names[t]] for ts in self.host_towers]
        owner = self.placement.owner
        self.owned = [[f for f in self.host_feats[h] if owner[f] == h * L + j] for j in range(L)]
        self.local_rank = lr
        first = next(iter(model.towers.values())).ebc
        self.local_ebc = _local_ebc(self.owned[lr], self.dim, _num_embeddings(first))
        self.plain_names = {}
        tower_of = {f: t for t, names in enumerate(self.tower_names) for f in names}
        for f in self.owned[lr]:
            w = f"embedding_bags.t_{f}.weight"
            src = model.towers[str(tower_of[f])].ebc
            self.plain_names[f"local_ebc.{w}"] = f"towers.{tower_of[f]}.ebc.{w}"
            if src.embedding_bags[f"t_{f}"].weight.device.type != "meta":
                self.local_ebc.embedding_bags[f"t_{f}"].weight = src.embedding_bags[f"t_{f}"].weight
        self.tower_modules = nn.ModuleDict(
            {str(t): model.towers[str(t)].tm for t in self.host_towers[h]}
        )
        for t in self.host_towers[h]:
            for n, _ in model.towers[str(t)].tm.named_parameters():
                self.plain_names[f"tower_modules.{t}.{n}"] = f"towers.{t}.tm.{n}"
        self.dense_arch, self.over_arch = model.dense_arch, model.over_arch

    def forward(self, dense_BDn: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """This rank's samples: dense [B, Dn], KJT (batch B) -> logits [B].

        Over 60 lines on purpose: the five SPTT steps of the module docstring, in order, each
        feeding the next its split sizes; the numbered comments mark them."""
        g, H, h, D = self.groups, self.topo.hosts, self.host, self.dim
        lengths, values, b = _split_kjt(sparse)
        mine = self.host_feats[h]
        # 1. ids of each host's towers to that host's peer (cross-host, same local rank)
        send_len = torch.cat(
            [torch.cat([lengths[f] for f in fs]) if fs else _EMPTY for fs in self.host_feats]
        ).to(LENGTH_DTYPE)
        rlen = self.comm.all_to_all(
            send_len,
            [len(fs) * b for fs in self.host_feats],
            [len(mine) * b] * H,
            g.cross,
            g.cross_ranks,
        ).view(H, len(mine), b)
        send_val = [torch.cat([values[f] for f in fs]) if fs else _EMPTY for fs in self.host_feats]
        rvals = self.comm.all_to_all(
            torch.cat(send_val),
            [v.numel() for v in send_val],
            rlen.sum((1, 2)).tolist(),
            g.cross,
            g.cross_ranks,
        )
        per_src = [
            torch.split(c, rlen[i].sum(1).tolist())
            for i, c in enumerate(torch.split(rvals, rlen.sum((1, 2)).tolist()))
        ]
        host_len = {f: rlen[:, q].reshape(-1).long() for q, f in enumerate(mine)}
        host_val = {f: torch.cat([per_src[i][q] for i in range(H)]) for q, f in enumerate(mine)}
        # 2. table-wise lookup inside the host for the H x B samples
        emb = table_wise_lookup(
            host_len,
            host_val,
            H * b,
            self.owned,
            self.local_rank,
            self.local_ebc,
            D,
            torch.zeros(0, requires_grad=True),
            self.comm,
            g.intra,
            g.intra_ranks,
        )
        # 3. tower modules of this host
        outs = [
            self.tower_modules[str(t)](torch.stack([emb[f] for f in self.tower_names[t]], dim=1))
            for t in self.host_towers[h]
        ]
        k_host = [sum(self.tower_k[t] for t in ts) for ts in self.host_towers]
        send = torch.cat(outs, dim=1).flatten() if outs else torch.zeros(0, requires_grad=True)
        # 4. tower outputs back to the samples' ranks (cross-host, differentiable)
        recv = self.comm.all_to_all_grad(
            send, [b * k_host[h] * D] * H, [b * k * D for k in k_host], g.cross, g.cross_ranks
        )
        tower_out: list[torch.Tensor | None] = [None] * len(self.tower_names)
        for hh, chunk in enumerate(torch.split(recv, [b * k * D for k in k_host])):
            parts = torch.split(
                chunk.view(b, k_host[hh], D), [self.tower_k[t] for t in self.host_towers[hh]], dim=1
            )
            for t, part in zip(self.host_towers[hh], parts):
                tower_out[t] = part
        # 5. global interaction + over arch on this rank's samples
        return DMT.head(self, dense_BDn, tower_out)

    def _grad_groups(self):
        dense = [*self.dense_arch.parameters(), *self.over_arch.parameters()]
        return [
            (dense, self.groups.world),
            (list(self.tower_modules.parameters()), self.groups.intra),
        ]

    def _norm_groups(self):
        unique = list(self.local_ebc.parameters()) if self.local_ebc is not None else []
        if self.local_rank == 0:  # tower modules: replicated over the host's ranks
            unique += list(self.tower_modules.parameters())
        return unique, [*self.dense_arch.parameters(), *self.over_arch.parameters()]


def analytic_cross_host_traffic(
    kind: str,
    topo: Topology,
    names: list[str],
    towers: list[list[str]],
    tower_k: list[int],
    dim: int,
    batch: int,
) -> list[tuple[int, int]]:
    """Per rank, the cross-host ``(bytes, messages)`` it sends in one step (forward +
    backward) for one id per feature and sample: ids (int64) + lengths (int32) forward, fp32
    embeddings forward and their gradients backward. A message is one (all-to-all, remote peer)
    pair with a non-empty payload, the unit ``SlowLink`` charges its latency on; with the bytes
    it gives the delay the link injects: ``SlowLink.delay(bytes, messages)``.

    Args:
        kind: ``flat`` (table-wise over the world) or ``sptt`` (towers on hosts; tower_k[t] = n_t
            without tower modules).
        batch: samples per rank.
    """
    id_b, emb_b = 8 + 4, 4 * dim * 2
    out = []
    if kind == "flat":
        owner = place_tables_flat(names, topo, dim)
        owns = {owner[f] for f in names}
        for r in range(topo.world_size):
            remote = [j for j in range(topo.world_size) if topo.host(j) != topo.host(r)]
            n_remote = sum(topo.host(owner[f]) != topo.host(r) for f in names)
            to_owners = sum(j in owns for j in remote)  # lengths, values, embedding gradients
            back = len(remote) if r in owns else 0  # the pooled embeddings I serve
            out.append((n_remote * batch * (id_b + emb_b), 3 * to_owners + back))
        return out
    tower_host = place_towers(towers, topo, dim).tower_host
    busy = set(tower_host)
    for r in range(topo.world_size):
        h = topo.host(r)
        nbytes = sum(
            batch * (len(fs) * id_b + tower_k[t] * emb_b)
            for t, fs in enumerate(towers)
            if tower_host[t] != h
        )
        to_hosts = sum(hh in busy for hh in range(topo.hosts) if hh != h)
        back = topo.hosts - 1 if h in busy else 0  # tower outputs to every peer
        out.append((nbytes, 3 * to_hosts + back))
    return out


def analytic_cross_host_bytes(
    kind: str,
    topo: Topology,
    names: list[str],
    towers: list[list[str]],
    tower_k: list[int],
    dim: int,
    batch: int,
) -> int:
    """Cross-host bytes of one step summed over ranks (``analytic_cross_host_traffic``)."""
    return sum(
        b for b, _ in analytic_cross_host_traffic(kind, topo, names, towers, tower_k, dim, batch)
    )
