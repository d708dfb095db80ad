"""The recommender training loop (DLRM and DMT): click data, BCE loss, AUC / normalized entropy.

The token trainer (``train/trainer.py``) assumes token batches, an LM loss and DTensor/FSDP
models; a click model has KeyedJaggedTensor batches, a sharded embedding layer with its own
gradient reduction and AUC-style metrics. Rather than branch inside that loop, the recsys
``ModelSpec`` names this small loop as its trainer (same interface: ``__init__(job, cfg,
plan)``, ``fit()``, ``close()``), and ``python -m train`` runs whichever the spec names.

Layout: every rank is a data-parallel rank with its own slice of the global batch; embeddings
are sharded (``model.name=dlrm``: flat table-wise; ``dmt``: SPTT over hosts x local ranks from
LOCAL_WORLD_SIZE), dense parts replicated. Loss = sum of per-sample BCE / global batch, so the
summed gradients equal the single-process gradients on the same global batch.

    python -m train experiment=dmt_synthetic
    torchrun --nproc_per_node=4 -m train experiment=dmt_synthetic   # LOCAL_WORLD_SIZE=4: 1 host
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from models.dlrm import DLRM
from models.dmt import DMT
from models.partitioner import TowerPlan, contiguous_plan, interaction_affinity, plan_from_affinity
from parallelism.dims import LayoutError
from parallelism.init import materialize_and_init_
from train.kernels import describe_kernels
from train.loaders import build_rec_loader
from train.metrics import MetricsLogger, plot_loss
from train.recsys_data import CriteoTSV, RecDataError, SyntheticClicks
from train.recsys_metrics import auc, normalized_entropy

RECSYS_DATA = ("synthetic_clicks", "criteo")


def build_rec_data(job: object) -> SyntheticClicks | CriteoTSV:
    """The click dataset named by ``data.name``."""
    d, m = job.data, job.model
    if d.name == "synthetic_clicks":
        return SyntheticClicks(
            d.num_sparse, d.num_groups, d.cardinality, d.num_dense, seed=job.train.seed
        )
    if d.name == "criteo":
        return CriteoTSV(d.path, m.num_embeddings, d.val_fraction)
    raise RecDataError(f"data.name={d.name!r} is not click data: use one of {RECSYS_DATA}")


def validate_recsys(job: object, dims: object) -> None:
    """Config checks before any process group (named fields, one line each)."""
    m, d = job.model, job.data
    if d.name not in RECSYS_DATA:
        raise LayoutError(
            f"data.name={d.name!r} cannot feed model.name={m.name}: use data=synthetic_clicks "
            "or data.name=criteo"
        )
    if d.name == "synthetic_clicks" and m.num_embeddings < d.cardinality:
        raise LayoutError(
            f"model.num_embeddings={m.num_embeddings} < data.cardinality={d.cardinality}"
        )
    if d.name == "criteo" and not Path(d.path).is_file():
        raise RecDataError(f"data.path={d.path!r} is not a file: point it at a Criteo TSV")
    n_sparse = 26 if d.name == "criteo" else d.num_sparse
    if m.name == "dmt" and not 1 <= m.num_towers <= n_sparse:
        raise LayoutError(
            f"model.num_towers={m.num_towers} must be between 1 and the {n_sparse} sparse features"
        )
    from parallelism.topology import Topology

    topo = Topology.from_env(dims.world_size)  # LOCAL_WORLD_SIZE must divide the world size
    if m.name == "dmt" and dims.world_size > 1 and m.num_towers < topo.hosts:
        raise LayoutError(
            f"model.num_towers={m.num_towers} < {topo.hosts} hosts: under SPTT every host holds at "
            "least one tower; raise model.num_towers"
        )
    custom_plan = m.name == "dmt" and m.tower_plan not in ("", "auto", "round_robin")
    if custom_plan and not Path(m.tower_plan).is_file():
        raise LayoutError(
            f"model.tower_plan={m.tower_plan!r} is not a file: use auto, round_robin or the "
            "path of a plan written by a previous run (tower_plan.yaml)"
        )
    if job.data.dali_device != "cpu":
        raise LayoutError(
            f"data.dali_device={job.data.dali_device}: the recommender path runs on CPU/gloo, "
            "so its DALI pipeline does too; set data.dali_device=cpu"
        )
    if job.optim.grad_clip > 0:
        raise LayoutError(
            f"optim.grad_clip={job.optim.grad_clip}: gradient clipping is not implemented for "
            "the recommender path; set optim.grad_clip=0"
        )


def build_plain(job: object, data, towers: list[list[str]] | None):
    """The plain DLRM / DMT (on the current default device)."""
    m = job.model
    common = dict(dense_layers=tuple(m.dense_layers), over_layers=tuple(m.over_layers))
    if m.name == "dlrm":
        return DLRM(
            data.num_dense, data.num_sparse, m.dim, m.num_embeddings, emb_std=m.init_std, **common
        )
    return DMT(
        data.num_dense, towers, m.dim, m.num_embeddings, m.tower_out, emb_std=m.init_std, **common
    )


def warmup_plan(job: object, data, steps: int) -> TowerPlan:
    """Train a flat DLRM for ``steps`` steps (one process, deterministic) and partition its
    features by interaction affinity (``models/partitioner.py``)."""
    m = job.model
    torch.manual_seed(job.train.seed)
    with torch.device("meta"):
        flat = DLRM(
            data.num_dense,
            data.num_sparse,
            m.dim,
            m.num_embeddings,
            tuple(m.dense_layers),
            tuple(m.over_layers),
            m.init_std,
        )
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


def resolve_tower_plan(job: object, data) -> TowerPlan:
    m = job.model
    if m.tower_plan in ("", "round_robin"):
        return contiguous_plan(data.names, m.num_towers, m.dim)
    if m.tower_plan == "auto":
        return warmup_plan(job, data, m.partition_warmup_steps)
    return TowerPlan.load(m.tower_plan)


class RecsysTrainer:
    """Owns the process group, the (sharded) click model, optimizer, data and metrics."""

    def __init__(self, job: object, cfg: DictConfig, plan: object) -> None:
        from train.trainer import build_optimizer, lr_lambda

        self.job, self.step = job, 0
        self.rank, self.world = plan.rank, plan.dims.world_size
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(seconds=job.parallel.timeout_s))
        self.run_dir = Path(job.run.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            OmegaConf.save(cfg, self.run_dir / "config.yaml")
        self.data = build_rec_data(job)
        self.tower_plan = resolve_tower_plan(job, self.data) if job.model.name == "dmt" else None
        if self.tower_plan is not None and self.rank == 0:
            self.tower_plan.save(self.run_dir / "tower_plan.yaml")
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, job.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(job.train.warmup_steps, job.train.steps, job.optim.min_lr_ratio),
        )
        self.n_micro = plan.n_micro
        self.train_loader = build_rec_loader(  # global batch k = data.batch("train", k)
            job.data,
            self.data,
            "train",
            job.train.global_batch_size,
            job.train.micro_batch_size,
            self.rank,
            self.world,
        )
        self.metrics = MetricsLogger(
            self.run_dir, self.rank == 0, job.train.steps, job.logging.progress
        )

    def _build_model(self):
        job = self.job
        towers = self.tower_plan.towers if self.tower_plan else None
        with torch.device("meta"):
            plain = build_plain(job, self.data, towers)
        if self.world == 1:
            materialize_and_init_(plain, job.train.seed)
            return plain
        from parallelism.dmt import Comm, ShardedDLRM, ShardedDMT
        from parallelism.topology import Topology, build_host_groups

        topo = Topology.from_env(self.world)
        groups = build_host_groups(topo, self.rank)
        cls = ShardedDLRM if job.model.name == "dlrm" else ShardedDMT
        with torch.device("meta"):
            model = cls(plain, topo, groups, Comm(topo, self.rank), self.rank)
        model.init_weights_(plain.init_tensor, job.train.seed)
        return model

    def _rank_rows(self, n: int) -> tuple[int, int]:
        per = n // self.world
        return self.rank * per, (self.rank + 1) * per

    def train_step(self) -> float:
        t = self.job.train
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for mb in self.train_loader.next_batch():
            loss = (
                F.binary_cross_entropy_with_logits(
                    self.model(mb.dense, mb.sparse), mb.labels, reduction="sum"
                )
                / t.global_batch_size
            )
            loss.backward()
            total += loss.item()
        if self.world > 1:
            self.model.reduce_gradients()
            buf = torch.tensor([total])
            dist.all_reduce(buf)
            total = buf.item()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return total

    @torch.no_grad()
    def evaluate(self) -> dict:
        """AUC and normalized entropy on the held-out split (``train.eval_batches`` batches)."""
        t = self.job.train
        self.model.eval()
        logits, labels, probs = [], [], []
        lo, hi = self._rank_rows(t.global_batch_size)
        for i in range(t.eval_batches):
            b = self.data.batch("val", i, t.global_batch_size).slice(lo, hi)
            logits.append(self.model(b.dense, b.sparse))
            labels.append(b.labels)
            if b.prob is not None:
                probs.append(b.prob)
        self.model.train()
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

    def fit(self) -> dict:
        t = self.job.train
        self.metrics.write(
            f"model: {self.job.model.name} ({sum(p.numel() for p in self.model.parameters())} "
            f"local params) | ranks: {self.world} | LOCAL_WORLD_SIZE: "
            f"{os.environ.get('LOCAL_WORLD_SIZE', self.world)}"
        )
        self.metrics.write(describe_kernels(self.job, None))
        start, last = time.perf_counter(), {}
        while self.step < t.steps:
            t0 = time.perf_counter()
            loss = self.train_step()
            dt = time.perf_counter() - t0
            every = self.job.logging.every
            if self.step in (1, t.steps) or (every and self.step % every == 0):
                last = {
                    "step": self.step,
                    "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "samples_per_s": t.global_batch_size / dt,
                    "step_time_s": dt,
                }
                self.metrics.log(last)
                self.metrics.progress(self.step, loss, t.global_batch_size / dt)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                self.metrics.log({"step": self.step, **self.evaluate()})
        final = {"step": self.step, **self.evaluate()}
        self.metrics.log(final)
        self.metrics.write(
            f"done: {self.step} steps in {time.perf_counter() - start:.1f}s, "
            + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "step")
        )
        return {**last, **final}

    def close(self) -> None:
        self.metrics.close()
        if self.rank == 0 and self.job.logging.plot and self.metrics.path.exists():
            plot_loss(self.metrics.path, self.run_dir / "loss.png")
        if dist.is_initialized():
            dist.destroy_process_group()
