"""The ``dmt`` family: DLRM's disaggregated multi-tower form (Luo et al., MLSys 2024).

Towers are groups of features chosen by the tower partitioner (``models/partitioner.py``) from a
flat-DLRM warm-up (``model.tower_plan=auto``), contiguously (``round_robin``), or from a pinned
plan file. The plan is the model's structure, so it is checkpoint state: a resumed run builds
from the checkpoint's plan (the warm-up does not run again), whatever the new layout; the
towers are then placed on the new host count (SPTT, ``parallelism/dmt.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.dmt import DMT
from models.errors import CheckpointError, LayoutError
from models.partitioner import TowerPlan, contiguous_plan, interaction_affinity, plan_from_affinity
from parallelism.init import materialize_and_init_
from train.config import ModelArgs
from train.families.recsys import DLRMArgs, RecsysFamily, plain_dlrm
from train.flops import FlopCount, dmt_step_flops


@dataclass
class DMTArgs(DLRMArgs):
    """``model=dmt_tiny``: DLRM's fields plus the towers'."""

    name: str = "dmt"
    num_towers: int = 4
    """Number of towers (each lives on one host under SPTT)."""
    tower_out: int = 1
    """Embeddings out of each tower module (0: no tower module, SPTT only)."""
    tower_plan: str = "auto"
    """``auto`` (partition from a flat-DLRM warm-up), ``round_robin``, or the path of a pinned
    plan YAML (every run writes its plan to ``<run.dir>/tower_plan.yaml``)."""
    partition_warmup_steps: int = 200
    """With ``tower_plan=auto``: flat-DLRM warm-up steps before partitioning."""


def warmup_plan(job: Any, data: Any, steps: int) -> TowerPlan:
    """Train a flat DLRM for ``steps`` steps (one process, deterministic) and partition its
    features by interaction affinity (``models/partitioner.py``)."""
    m = job.model
    torch.manual_seed(job.train.seed)
    with torch.device("meta"):
        flat = plain_dlrm(job, data)
    materialize_and_init_(flat, job.train.seed)
    opt = torch.optim.Adam(flat.parameters(), lr=job.optim.lr)
    for s in range(steps):
        b = data.batch("train", s, job.train.global_batch_size)
        F.binary_cross_entropy_with_logits(flat(b.dense, b.sparse), b.labels).backward()
        opt.step()
        opt.zero_grad()
    probe = data.batch("val", 0, 4096)
    aff = interaction_affinity(flat, probe.dense, probe.sparse)
    return plan_from_affinity(aff, data.names, m.num_towers, m.dim)


def resolve_tower_plan(job: Any, data: Any) -> TowerPlan:
    m = job.model
    if m.tower_plan in ("", "round_robin"):
        return contiguous_plan(data.names, m.num_towers, m.dim)
    if m.tower_plan == "auto":
        return warmup_plan(job, data, m.partition_warmup_steps)
    return TowerPlan.load(m.tower_plan)


class DMTFamily(RecsysFamily):
    name: ClassVar[str] = "dmt"
    args: ClassVar[type[ModelArgs]] = DMTArgs

    def __init__(self, job: Any, dims: Any, rank: int) -> None:
        super().__init__(job, dims, rank)
        self.plan: TowerPlan | None = None

    def validate(self) -> None:
        super().validate()
        m, n_sparse = self.job.model, self.num_sparse()
        if not 1 <= m.num_towers <= n_sparse:
            raise LayoutError(
                f"model.num_towers={m.num_towers} must be between 1 and the {n_sparse} sparse "
                "features"
            )
        from parallelism.topology import Topology

        topo = Topology.from_env(self.world)  # LOCAL_WORLD_SIZE must divide the world size
        if self.world > 1 and m.num_towers < topo.hosts:
            raise LayoutError(
                f"model.num_towers={m.num_towers} < {topo.hosts} hosts: under SPTT every host "
                "holds at least one tower; raise model.num_towers"
            )
        if m.tower_plan not in ("", "auto", "round_robin") and not Path(m.tower_plan).is_file():
            raise LayoutError(
                f"model.tower_plan={m.tower_plan!r} is not a file: use auto, round_robin or the "
                "path of a plan written by a previous run (tower_plan.yaml)"
            )

    def build_model(self, device: torch.device, saved: Any = None) -> nn.Module:
        data = self.click_data()
        if saved is not None and saved.get("tower_plan") is not None:
            self.plan = TowerPlan.from_dict(saved["tower_plan"])
        else:
            self.plan = resolve_tower_plan(self.job, data)
        if self.rank == 0:
            self.plan.save(Path(self.job.run.dir) / "tower_plan.yaml")
        return super().build_model(device, saved)

    def build_plain(self) -> nn.Module:
        m, data = self.job.model, self.click_data()
        common = dict(dense_layers=tuple(m.dense_layers), over_layers=tuple(m.over_layers))
        towers = self.plan.towers
        return DMT(
            data.num_dense,
            towers,
            m.dim,
            m.num_embeddings,
            m.tower_out,
            emb_std=m.init_std,
            **common,
        )

    def shard(self, plain: nn.Module, topo: Any, groups: Any, comm: Any) -> nn.Module:
        from parallelism.dmt import ShardedDMT

        return ShardedDMT(plain, topo, groups, comm, self.rank)

    def flops_per_step(self) -> FlopCount:
        """As DLRM's, plus every tower module; the global interaction spans the towers'
        outputs (the plan is known once ``build_model`` ran)."""
        m, data = self.job.model, self.click_data()
        return dmt_step_flops(
            self.job.train.global_batch_size,
            data.num_dense,
            self.plan.towers,
            m.dim,
            m.tower_out,
            list(m.dense_layers),
            list(m.over_layers),
        )

    def state_dict(self) -> dict:
        return {"tower_plan": self.plan.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("tower_plan")
        if saved is not None and TowerPlan.from_dict(saved).towers != self.plan.towers:
            raise CheckpointError(
                "the checkpoint's tower plan differs from the one this run was built with "
                f"(model.tower_plan={self.job.model.tower_plan!r}): resume with "
                "model.tower_plan=auto (the checkpoint's plan is used)"
            )
