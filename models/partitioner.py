"""DMT's Tower Partitioner (Luo et al., MLSys 2024, sec. 3.3): group sparse features into towers
whose members interact, with balanced tower cost, from a flat model's learned embeddings.

Affinity. For a trained flat DLRM, the over arch sees the pairwise dot product
``z_ij = <e_i, e_j>`` of every feature pair. How much pair (i, j) matters to the prediction is
estimated by ``std_batch(z_ij) * ||W1[:, col(i, j)]||``: the spread of the interaction over a
batch times the norm of the over arch's first-layer weights reading it (a first-order
sensitivity). Pairs that the generating process made interact get a large affinity; pairs that
never interact are driven towards zero weight. The paper clusters feature embeddings with a
constrained k-means; we cluster this pairwise affinity directly because it is the quantity the
tower split has to preserve (an interaction cut by a tower boundary is only seen through the
compressed tower outputs).

Clustering. Balanced agglomerative clustering (average linkage, merges only while the merged
cost stays under ``max_imbalance x mean tower cost``), then single-feature moves and pairwise
swaps that raise the within-tower affinity without breaking the cost bound. Tower cost is
``lookups x dim`` (pooling factor x embedding dimension) per feature, summed.

The result is a ``TowerPlan`` (feature names per tower, their costs) that can be written as
YAML, read back and pinned with ``model.tower_plan=<file>``. Written here: TorchRec has no
partitioner (its planner places tables, it does not choose towers). The adjusted Rand index is
written here too (a few lines) so tests need no scikit-learn.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from math import comb
from pathlib import Path

import torch
import yaml
from torch import nn

from models.dlrm import DLRM


@dataclass
class TowerPlan:
    """Feature names per tower, with each tower's cost (lookups x dim)."""

    towers: list[list[str]]
    costs: list[float] = field(default_factory=list)
    method: str = "affinity"

    @property
    def imbalance(self) -> float:
        """max / mean tower cost (1.0 is perfectly balanced)."""
        mean = sum(self.costs) / len(self.costs)
        return max(self.costs) / mean if mean else 1.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "num_towers": len(self.towers),
            "max_over_mean_cost": round(self.imbalance, 4),
            "towers": [{"features": t, "cost": c} for t, c in zip(self.towers, self.costs)],
        }

    def save(self, path: str | Path) -> None:
        """Write the plan as YAML (pin it with ``model.tower_plan=<path>``)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict) -> TowerPlan:
        towers = [list(t["features"]) for t in d["towers"]]
        return cls(towers, [float(t.get("cost", 0.0)) for t in d["towers"]], d.get("method", ""))

    @classmethod
    def load(cls, path: str | Path) -> TowerPlan:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))


def contiguous_plan(names: list[str], num_towers: int, dim: int) -> TowerPlan:
    """Features in order, split into ``num_towers`` equal runs (the naive baseline)."""
    per = [names[i::num_towers] for i in range(num_towers)]
    per = [sorted(p, key=names.index) for p in per]
    return TowerPlan(per, [float(len(p) * dim) for p in per], "round_robin")


def _first_linear(module: nn.Module) -> nn.Linear:
    return next(m for m in module.modules() if isinstance(m, nn.Linear))


@torch.no_grad()
def interaction_affinity(model: DLRM, dense_BDn: torch.Tensor, sparse) -> torch.Tensor:
    """Pairwise feature affinity [F, F] from a (trained) flat DLRM on one batch.

    Args:
        model: a plain ``DLRM``.
        dense_BDn: [B, num_dense].
        sparse: KeyedJaggedTensor with batch B.

    Returns:
        Symmetric [F, F] non-negative affinities, zero diagonal.
    """
    emb_BFD = model.sparse_arch(sparse)
    d_BD = model.dense_arch(dense_BDn)
    x = torch.cat([d_BD.unsqueeze(1), emb_BFD], dim=1)
    n = x.shape[1]
    i, j = torch.triu_indices(n, n, offset=1)
    z_BP = torch.bmm(x, x.transpose(1, 2))[:, i, j]
    w = _first_linear(model.over_arch).weight[:, model.dim :]  # columns reading the dots
    imp_P = z_BP.std(0) * w.norm(dim=0)
    f = n - 1
    aff = torch.zeros(f, f)
    keep = i > 0
    aff[i[keep] - 1, j[keep] - 1] = imp_P[keep]
    return aff + aff.t()


def _within(aff: torch.Tensor, groups: list[list[int]]) -> float:
    return sum(aff[g][:, g].sum().item() for g in groups) / 2


def partition_features(
    aff: torch.Tensor, costs: list[float], num_towers: int, max_imbalance: float = 1.1
) -> list[list[int]]:
    """Balanced clustering of features by affinity (see module docstring).

    Args:
        aff: [F, F] symmetric affinity.
        costs: per-feature cost (lookups x dim).
        num_towers: K.
        max_imbalance: bound on max tower cost / mean tower cost.

    Returns:
        K lists of feature indices, each sorted.
    """
    f = aff.shape[0]
    if num_towers < 1 or num_towers > f:
        raise ValueError(f"model.num_towers={num_towers} must be in [1, {f}] (number of features)")
    cap = max_imbalance * sum(costs) / num_towers + 1e-9
    groups = [[i] for i in range(f)]
    cost = lambda g: sum(costs[i] for i in g)  # noqa: E731
    while len(groups) > num_towers:
        best, pair = None, None
        for a, b in itertools.combinations(range(len(groups)), 2):
            c = cost(groups[a]) + cost(groups[b])
            link = aff[groups[a]][:, groups[b]].mean().item()
            key = (c <= cap, link, -c)
            if best is None or key > best:
                best, pair = key, (a, b)
        a, b = pair
        groups[a] = groups[a] + groups[b]
        del groups[b]
    groups = _repair(aff, groups, costs, cap)
    groups = _refine(aff, groups, costs, cap)
    return [sorted(g) for g in groups]


def _repair(aff: torch.Tensor, groups: list[list[int]], costs: list[float], cap: float):
    """Move features out of towers over ``cap`` to towers with room, losing the least affinity
    (greedy merging can leave no feasible merge; this restores the cost bound)."""
    cost = lambda g: sum(costs[i] for i in g)  # noqa: E731
    while True:
        over = [a for a, g in enumerate(groups) if cost(g) > cap and len(g) > 1]
        best = None
        for a in over:
            for x in groups[a]:
                for b, gb in enumerate(groups):
                    if b == a or cost(gb) + costs[x] > cap:
                        continue
                    loss = aff[x, groups[a]].sum().item() - aff[x, gb].sum().item()
                    if best is None or loss < best[0]:
                        best = (loss, a, x, b)
        if best is None:
            return groups
        _, a, x, b = best
        groups[a] = [i for i in groups[a] if i != x]
        groups[b] = [*groups[b], x]


def _refine(aff: torch.Tensor, groups: list[list[int]], costs: list[float], cap: float):
    """Moves and swaps that raise within-tower affinity and keep every tower under ``cap``."""
    cost = lambda g: sum(costs[i] for i in g)  # noqa: E731
    ok = lambda gs: all(cost(g) <= cap for g in gs)  # noqa: E731
    improved = True
    while improved:
        improved = False
        base = _within(aff, groups)
        for a, b in itertools.permutations(range(len(groups)), 2):
            for x in list(groups[a]):
                cands = [None, *groups[b]]
                for y in cands:
                    ga = [i for i in groups[a] if i != x] + ([y] if y is not None else [])
                    gb = [i for i in groups[b] if i != y] + [x]
                    if not ga:
                        continue
                    trial = [g for g in groups]
                    trial[a], trial[b] = ga, gb
                    if ok(trial) and _within(aff, trial) > base + 1e-9:
                        groups, improved = trial, True
                        break
                if improved:
                    break
            if improved:
                break
    return groups


def plan_from_affinity(
    aff: torch.Tensor,
    names: list[str],
    num_towers: int,
    dim: int,
    lookups: list[float] | None = None,
) -> TowerPlan:
    """Partition and wrap the result as a ``TowerPlan`` with per-tower cost."""
    costs = [(lookups[i] if lookups else 1.0) * dim for i in range(len(names))]
    groups = partition_features(aff, costs, num_towers)
    return TowerPlan(
        [[names[i] for i in g] for g in groups], [sum(costs[i] for i in g) for g in groups]
    )


def adjusted_rand_index(a: list[int], b: list[int]) -> float:
    """Adjusted Rand index of two labelings of the same items (Hubert & Arabie, 1985)."""
    n = len(a)
    pairs = {}
    for x, y in zip(a, b):
        pairs[(x, y)] = pairs.get((x, y), 0) + 1
    rows, cols = {}, {}
    for (x, y), c in pairs.items():
        rows[x] = rows.get(x, 0) + c
        cols[y] = cols.get(y, 0) + c
    idx = sum(comb(c, 2) for c in pairs.values())
    ra, cb = sum(comb(c, 2) for c in rows.values()), sum(comb(c, 2) for c in cols.values())
    expected = ra * cb / comb(n, 2)
    top = (ra + cb) / 2
    return 1.0 if top == expected else (idx - expected) / (top - expected)
