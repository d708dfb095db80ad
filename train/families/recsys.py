"""What the two recommender families (``dlrm``, ``dmt``) share: click data, BCE loss, the
sharded model, gradient reduction and clipping, and AUC / normalized-entropy evaluation.

Layout: every rank is a data-parallel rank with its own slice of the global batch; embeddings
are sharded (``dlrm``: flat table-wise; ``dmt``: SPTT over hosts x local ranks from
LOCAL_WORLD_SIZE, ``parallelism/dmt.py``), dense parts replicated. Loss = sum of per-sample BCE
/ global batch, so the summed gradients equal the single-process gradients on the same global
batch, and the logged loss is the sum over ranks.

Checkpoints: a sharded model names its parameters by where they live (``local_ebc...``); the
adapter gives each its plain-model name, so a checkpoint is the unsharded model's and resumes
on any hosts x local-ranks layout or world size: every table is read by its new owner.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from checkpoint.adapter import CheckpointAdapter
from models.dlrm import DLRM
from models.errors import ConfigError, LayoutError, RecDataError
from parallelism.init import materialize_and_init_
from parallelism.utils import clip_grad_norm_
from train.config import ModelArgs
from train.families.base import Family
from train.flops import FlopCount, dlrm_step_flops
from train.loaders import RecLoader, build_rec_loader
from train.recsys_data import CriteoTSV, SyntheticClicks
from train.recsys_metrics import auc, normalized_entropy

RECSYS_DATA = ("synthetic_clicks", "criteo")


@dataclass
class DLRMArgs(ModelArgs):
    """``model=dlrm_tiny``: a flat DLRM (TorchRec arches); ``dim`` is the embedding size."""

    name: str = "dlrm"
    dim: int = 16
    """Embedding dimension."""
    num_embeddings: int = 64
    """Rows per embedding table (Criteo ids are hashed modulo this)."""
    dense_layers: list[int] = field(default_factory=lambda: [32])
    """Hidden sizes of the dense arch (``dim`` is appended)."""
    over_layers: list[int] = field(default_factory=lambda: [64, 32])
    """Hidden sizes of the over arch (the 1-logit output is appended)."""
    init_std: float = 0.1
    """Standard deviation of the normal initialisation of the embedding tables."""


_TOKEN_ONLY = "token-model field; a recommender trains on click samples"
_LAYOUT = "the recommender layout is data parallel with sharded tables (docs/dmt.md)"


class RecsysFamily(Family):
    """Shared by ``dlrm`` and ``dmt``; subclasses build the plain and the sharded model."""

    unit: ClassVar[str] = "samples"
    refuses: ClassVar[dict[str, str]] = {
        "train.seq_len": _TOKEN_ONLY,
        "train.activation_checkpoint": "no transformer blocks to recompute",
        "train.compile": "torch.compile of TorchRec's sharded lookup is not supported",
        "data.dali_device": "the recommender path runs on CPU/gloo; set data.dali_device=cpu",
        "data.document_mask": "click data has no documents",
        **{f"parallel.{k}": _LAYOUT for k in ("tp", "pp", "sp", "ep", "dp_replicate")},
        **{
            f"parallel.{k}": "pipeline/tensor-parallel field; " + _LAYOUT
            for k in (
                "pp_schedule",
                "pp_virtual",
                "pp_microbatches",
                "sequence_parallel_norms",
                "allow_cross_host_tp",
            )
        },
    }

    def __init__(self, job: Any, dims: Any, rank: int) -> None:
        super().__init__(job, dims, rank)
        self.world = dims.world_size
        self.data: SyntheticClicks | CriteoTSV | None = None

    # -- before launch ------------------------------------------------------------------------
    def validate(self) -> None:
        job, m, d = self.job, self.job.model, self.job.data
        if d.name not in RECSYS_DATA:
            raise ConfigError(
                f"data.name={d.name!r} cannot feed model.name={m.name}: use data=synthetic_clicks "
                "or data.name=criteo"
            )
        if d.name == "synthetic_clicks" and m.num_embeddings < d.cardinality:
            raise LayoutError(
                f"model.num_embeddings={m.num_embeddings} < data.cardinality={d.cardinality}"
            )
        if d.name == "criteo" and not Path(d.path).is_file():
            raise RecDataError(f"data.path={d.path!r} is not a file: point it at a Criteo TSV")
        if job.parallel.backend == "nccl":
            raise LayoutError(
                f"parallel.backend=nccl: the recommender path runs on CPU with gloo ({_LAYOUT}); "
                "use parallel.backend=auto or gloo"
            )

    def use_cuda(self) -> bool:
        return False  # TorchRec's CPU kernels and our gloo all-to-alls (parallelism/dmt.py)

    def num_sparse(self) -> int:
        return 26 if self.job.data.name == "criteo" else self.job.data.num_sparse

    # -- build ----------------------------------------------------------------------------------
    def click_data(self) -> SyntheticClicks | CriteoTSV:
        """The click dataset named by ``data.name`` (built once)."""
        if self.data is None:
            d, m = self.job.data, self.job.model
            if d.name == "synthetic_clicks":
                self.data = SyntheticClicks(
                    d.num_sparse, d.num_groups, d.cardinality, d.num_dense, seed=self.job.train.seed
                )
            else:
                self.data = CriteoTSV(d.path, m.num_embeddings, d.val_fraction)
        return self.data

    def build_plain(self) -> nn.Module:
        """The single-process model (on the current default device)."""
        raise NotImplementedError

    def shard(self, plain: nn.Module, topo: Any, groups: Any, comm: Any) -> nn.Module:
        """The sharded model for ``world > 1`` (``parallelism/dmt.py``)."""
        raise NotImplementedError

    def build_model(self, device: torch.device, saved: Any = None) -> nn.Module:
        job = self.job
        self.click_data()
        with torch.device("meta"):
            plain = self.build_plain()
        if self.world == 1:
            materialize_and_init_(plain, job.train.seed)
            return plain
        from parallelism.dmt import Comm
        from parallelism.topology import Topology, build_host_groups

        topo = Topology.from_env(self.world)
        groups = build_host_groups(topo, self.rank)
        with torch.device("meta"):
            model = self.shard(plain, topo, groups, Comm(topo, self.rank))
        model.init_weights_(plain.init_tensor, job.train.seed)
        return model

    def build_loaders(self) -> tuple[Any, Any]:
        t, data = self.job.train, self.click_data()
        train = build_rec_loader(  # global batch k = data.batch("train", k)
            self.job.data,
            data,
            "train",
            t.global_batch_size,
            t.micro_batch_size,
            self.rank,
            self.world,
        )
        # Validation: this rank's rows of each global batch, in one piece.
        val = RecLoader(
            data,
            "val",
            t.global_batch_size,
            t.global_batch_size // self.world,
            self.rank,
            self.world,
        )
        return train, val

    def checkpoint_adapter(self, model: nn.Module) -> CheckpointAdapter:
        rename = getattr(model, "plain_name", None)
        tables = frozenset(
            (rename or str)(n) for n, _ in model.named_parameters() if ".embedding_bags." in n
        )
        if rename is None:
            return CheckpointAdapter(tables=tables)
        return CheckpointAdapter(logical_name=rename, tables=tables)

    # -- one step -------------------------------------------------------------------------------
    def forward_backward(self, model: nn.Module, micro_batches: list) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        g = self.job.train.global_batch_size
        for mb in micro_batches:
            with self.autocast():
                logits = model(mb.dense, mb.sparse)
            loss = F.binary_cross_entropy_with_logits(logits.float(), mb.labels, reduction="sum")
            loss = loss / g
            loss.backward()
            total += loss.detach()
        return total

    def reduce_gradients(self, model: nn.Module) -> None:
        if self.world > 1:
            model.reduce_gradients()

    def clip_grad_norm(self, model: nn.Module, max_norm: float, pipeline_group: Any) -> Any:
        if self.world > 1:
            return model.clip_grad_norm_(max_norm)
        return clip_grad_norm_(model.parameters(), max_norm)

    def grad_norm(self, model: nn.Module) -> Any:
        if self.world > 1:  # each sharded table counted once (tables live on one rank)
            return lambda params: model.clip_grad_norm_(0.0)
        return super().grad_norm(model)

    def flops_per_step(self) -> FlopCount:
        """Dense/over MLPs and the dot interaction of the global batch (lookups: no FLOPs)."""
        m, data = self.job.model, self.click_data()
        return dlrm_step_flops(
            self.job.train.global_batch_size,
            data.num_dense,
            data.num_sparse,
            m.dim,
            list(m.dense_layers),
            list(m.over_layers),
        )

    def global_loss(self, local: torch.Tensor) -> float:
        if self.world > 1:
            local = local.clone()
            dist.all_reduce(local)
        return local.item()

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, val_loader: Any) -> dict:
        """AUC and normalized entropy on the held-out split (``train.eval_batches`` batches)."""
        model.eval()
        val_loader.load_state_dict({"consumed_samples": 0})
        logits, labels, probs = [], [], []
        for _ in range(self.job.train.eval_batches):
            for b in val_loader.next_batch():
                with self.autocast():
                    logits.append(model(b.dense, b.sparse).float())
                labels.append(b.labels)
                if b.prob is not None:
                    probs.append(b.prob)
        model.train()
        cols = [torch.cat(logits), torch.cat(labels)] + ([torch.cat(probs)] if probs else [])
        x = torch.stack(cols)
        if self.world > 1:
            parts = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(parts, x)
            x = torch.cat(parts, dim=1)
        out = {"val_auc": auc(x[0], x[1]), "val_ne": normalized_entropy(x[0], x[1])}
        if probs:
            out["best_auc"] = auc(x[2], x[1])
        return out

    def describe(self, model: nn.Module) -> str:
        n = sum(p.numel() for p in model.parameters())
        hosts = os.environ.get("LOCAL_WORLD_SIZE", self.world)
        return (
            f"{self.job.model.name} ({n} local params) | ranks: {self.world} | "
            f"LOCAL_WORLD_SIZE: {hosts}"
        )

    def layout(self) -> dict:
        from parallelism.topology import Topology

        topo = Topology.from_env(self.world)
        return {"hosts": topo.hosts, "local_world_size": topo.local_world_size}


def plain_dlrm(job: Any, data: Any) -> DLRM:
    """The flat DLRM of ``model.*`` on ``data``'s features."""
    m = job.model
    return DLRM(
        data.num_dense,
        data.num_sparse,
        m.dim,
        m.num_embeddings,
        tuple(m.dense_layers),
        tuple(m.over_layers),
        m.init_std,
    )
