"""The training loop: build (mesh, model, optimizer, data), train, validate, log, close.

Everything that can be wrong with the input is checked by ``plan_run`` before any process group
exists, and reported as one line (``LayoutError``, ``DataError``, ``ConfigError``). The loop
itself holds no parallel math: model-family specifics come from a ``ModelSpec`` and every
parallel transformation from ``parallelism/``.

Loss scaling: each micro-batch contributes ``mean_token_loss / n_micro``; data-parallel
gradient reduction averages over ranks; so the update equals the single-process update on the
same global batch (all micro-batches have the same token count), whatever the layout.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from checkpoint import Manager, validate_checkpoint_args
from parallelism.dims import LayoutError, ParallelDims, dims_from_config
from parallelism.ulysses import sequence_slice
from parallelism.utils import all_reduce_mean, clip_grad_norm_
from train.config import JobConfig
from train.data import TokenLoader, TokenShards, resolve_data_dir
from train.kernels import apply_fused_rmsnorm, build_apex_fused_adam, describe_kernels
from train.loaders import build_token_loader
from train.metrics import MetricsLogger, plot_loss
from train.optional import check_optional_packages
from train.specs import ModelSpec, get_model_spec


@dataclass
class RunPlan:
    """Everything decided before processes talk to each other."""

    dims: ParallelDims
    spec: ModelSpec
    data_dir: Path
    """Token shard folder; for a spec with its own trainer, ``data.path`` unresolved."""
    n_micro: int
    rank: int
    local_rank: int


def plan_run(job: JobConfig) -> RunPlan:
    """Validate the config against the world size and the data; no process group is created."""
    dims = dims_from_config(job.parallel)
    t = job.train
    for name in ("steps", "global_batch_size", "micro_batch_size", "seq_len"):
        if getattr(t, name) < 1:
            raise LayoutError(f"train.{name}={getattr(t, name)} must be >= 1")
    per_step = t.micro_batch_size * dims.dp
    if t.global_batch_size % per_step:
        raise LayoutError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dims.dp}: "
            f"use a multiple of {per_step} or change train.micro_batch_size"
        )
    if t.dtype not in ("fp32", "bf16"):
        raise LayoutError(f"train.dtype={t.dtype!r} must be 'fp32' or 'bf16'")
    spec = get_model_spec(job.model.name)
    spec.validate(job, dims)
    validate_checkpoint_args(job.checkpoint)
    from offload.build import validate_offload_args

    validate_offload_args(job.offload)
    if job.offload.kind != "none":
        for name in ("tp", "pp", "sp", "ep"):
            if getattr(dims, name) > 1:
                raise LayoutError(
                    f"offload.kind={job.offload.kind} with parallel.{name}={getattr(dims, name)} "
                    "is not supported yet: offload composes with data parallelism only"
                )
    check_optional_packages(job)  # data.backend=dali / optim.impl=apex_fused_adam installed?
    data_dir = resolve_data_dir(job.data) if spec.trainer is None else Path(job.data.path)
    return RunPlan(
        dims,
        spec,
        data_dir,
        t.global_batch_size // per_step,
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_optimizer(model: nn.Module, optim: object) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only; fused kernel where the parameters allow it."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kw = {"lr": optim.lr, "betas": (optim.beta1, optim.beta2), "eps": optim.eps}
    impl = optim.impl
    if impl == "auto":
        impl = "fused"
    if impl == "fused":
        kw["fused"] = True
    elif impl == "foreach":
        kw["foreach"] = True
    elif impl == "for_loop":
        kw["foreach"] = False
    elif impl == "apex_fused_adam":
        return build_apex_fused_adam(groups, kw)
    else:
        raise LayoutError(
            f"optim.impl={optim.impl!r}: use auto, fused, foreach, for_loop or apex_fused_adam"
        )
    return torch.optim.AdamW(groups, **kw)


class Trainer:
    """Owns the process group, model, optimizer, data and metrics of one run."""

    def __init__(self, job: JobConfig, cfg: DictConfig, plan: RunPlan) -> None:
        self.job, self.plan, self.dims = job, plan, plan.dims
        self.step = 0
        self.device = self._init_distributed()
        self.is_rank0 = plan.rank == 0
        self.run_dir = Path(job.run.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_rank0:
            OmegaConf.save(cfg, self.run_dir / "config.yaml")
        torch.manual_seed(job.train.seed)
        self.model = plan.spec.build_and_parallelize(job, self.dims, self.device)
        self.fused_norms = apply_fused_rmsnorm(self.model) if self.dims.tp == 1 else 0
        if job.offload.kind != "none":
            from offload import build_offload_optimizer

            self.optimizer = build_offload_optimizer(self.model, job.optim, job.offload)
        else:
            self.optimizer = build_optimizer(self.model, job.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(job.train.warmup_steps, job.train.steps, job.optim.min_lr_ratio),
        )
        self.train_loader, self.val_loader = self._build_loaders()
        sp_rank = self.dims.coordinate(plan.rank)["sp"]
        self.seq_slice = sequence_slice(job.train.seq_len, sp_rank, self.dims.sp)
        self.pipeline = None  # parallelism.pipeline.PipelineRunner when parallel.pp > 1
        if self.dims.pp > 1:
            from parallelism.pipeline import PipelineRunner

            loss_fn = lambda out, y: plan.spec.loss(out, y, job)  # noqa: E731
            self.pipeline = PipelineRunner(self.model, self.dims, job, loss_fn, self.device)
        self.loss_group = self.dims.submesh("dp_sp").get_group() if self.distributed else None
        self.ckpt = Manager(
            job.checkpoint,
            self.run_dir,
            config=OmegaConf.to_container(cfg, resolve=True),
            layout=dict(zip(("pp", "dp_replicate", "dp_shard", "sp", "tp"), self.dims.mesh_shape)),
        )
        self.step = self.ckpt.maybe_resume(
            self.model, self.optimizer, self.scheduler, self.train_loader
        )
        self.metrics = MetricsLogger(
            self.run_dir,
            self.is_rank0,
            job.train.steps,
            job.logging.progress,
            job.logging.wandb_project if job.logging.wandb else None,
            OmegaConf.to_container(cfg) if job.logging.wandb else None,
            append=bool(job.checkpoint.resume),
        )

    # -- set-up -------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.dims.world_size > 1

    def _init_distributed(self) -> torch.device:
        p = self.job.parallel
        use_cuda = torch.cuda.is_available() and p.backend != "gloo"
        device = torch.device("cuda", self.plan.local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if self.distributed and not dist.is_initialized():
            backend = p.backend if p.backend != "auto" else ("nccl" if use_cuda else "gloo")
            dist.init_process_group(backend, timeout=timedelta(seconds=p.timeout_s))
        if self.distributed:
            self.dims.build_mesh(device.type)
        return device

    def _build_loaders(self) -> tuple[TokenLoader, TokenLoader]:
        t, d = self.job.train, self.dims
        coord = d.coordinate(self.plan.rank)
        dp_rank = coord["dp_replicate"] * d.dp_shard + coord["dp_shard"]
        mk = lambda split, shuffle: build_token_loader(  # noqa: E731
            self.job.data,
            TokenShards.open(self.plan.data_dir, split),
            t.seq_len,
            t.global_batch_size,
            t.micro_batch_size,
            dp_rank,
            d.dp,
            t.seed,
            shuffle,
        )
        return mk("train", True), mk("val", False)

    # -- one step -----------------------------------------------------------------------------
    def _local_tokens(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """This rank's part of a micro-batch: its sequence slice under Ulysses (sp > 1), with
        the global positions of those tokens."""
        sl = self.seq_slice
        x, y = (
            x[:, sl].to(self.device, non_blocking=True),
            y[:, sl].to(self.device, non_blocking=True),
        )
        return x, y, torch.arange(sl.start, sl.stop, device=self.device)

    def _autocast(self):
        from parallelism.tensor_parallel import tp_loss_context

        stack = ExitStack()
        if self.job.train.dtype == "bf16":
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        stack.enter_context(tp_loss_context(self.dims.tp))  # vocab-parallel loss: fwd and bwd
        return stack

    def forward_backward(self, micro_batches: list) -> torch.Tensor:
        """Accumulate gradients over this rank's micro-batches; returns the mean loss."""
        if self.pipeline is not None:
            with self._autocast():
                return self.pipeline.forward_backward(micro_batches)
        total = torch.zeros((), device=self.device)
        n = len(micro_batches)
        for x, y in micro_batches:
            x, y, pos = self._local_tokens(x, y)
            with self._autocast():
                loss = self.plan.spec.loss(self.model(x, pos), y, self.job) / n
            loss.backward()
            total += loss.detach()
        return total

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(self.train_loader.next_batch())
        self.ckpt.wait_before_update()  # a lazy snapshot must be on the host before weights change
        if getattr(self.optimizer, "owns_grad_clip", False):  # offload: norm/clip/skip inside
            self.optimizer.step()
            grad_norm = self.optimizer.last_grad_norm
        else:
            pp_group = self.pipeline.pp_group if self.pipeline is not None else None
            grad_norm = clip_grad_norm_(self.model.parameters(), self.job.optim.grad_clip, pp_group)
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        self.val_loader.load_state_dict({"consumed_samples": 0})
        losses = []
        for _ in range(self.job.train.eval_batches):
            if self.pipeline is not None:
                with self._autocast():
                    losses.append(self.pipeline.evaluate(self.val_loader.next_batch()))
                continue
            for x, y in self.val_loader.next_batch():
                x, y, pos = self._local_tokens(x, y)
                with self._autocast():
                    out = self.model(x, pos)
                losses.append(self.plan.spec.loss(out, y, self.job).item())
        self.model.train()
        return all_reduce_mean(sum(losses) / len(losses), self.loss_group)

    # -- loop ---------------------------------------------------------------------------------
    def _should_log(self) -> bool:
        every = self.job.logging.every
        return (
            self.step == 1
            or self.step == self.job.train.steps
            or (every > 0 and self.step % every == 0)
        )

    def fit(self) -> dict:
        """Train ``train.steps`` steps; returns the last logged record."""
        t = self.job.train
        tokens_per_step = t.global_batch_size * t.seq_len
        self.metrics.write(
            f"model: {self.plan.spec.describe(self.model)} | layout: {self.dims.mesh_shape} "
            f"(pp, dp_replicate, dp_shard, sp, tp) | micro-batches/step: {self.plan.n_micro}"
        )
        self.metrics.write(describe_kernels(self.job, self.fused_norms))
        start, last = time.perf_counter(), {}
        while self.step < t.steps:
            t0 = time.perf_counter()
            loss, grad_norm = self.train_step()
            dt = time.perf_counter() - t0
            if self._should_log():
                last = {
                    "step": self.step,
                    "loss": all_reduce_mean(loss.item(), self.loss_group),
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm.item(),
                    "tokens_per_s": tokens_per_step / dt,
                    "step_time_s": dt,
                    "elapsed_s": time.perf_counter() - start,
                }
                if self.plan.spec.metrics is not None:
                    last.update(self.plan.spec.metrics(self.model))
                self.metrics.log(last)
                self.metrics.progress(self.step, last["loss"], last["tokens_per_s"])
            if self.ckpt.due(self.step):
                self.ckpt.save_async(self.step)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                self.metrics.log({"step": self.step, "val_loss": self.evaluate()})
            if t.max_time_s and time.perf_counter() - start > t.max_time_s:
                self.metrics.write(f"stopping at step {self.step}: train.max_time_s reached")
                break
        if self.ckpt.due(self.step, final=True) and self.ckpt.last_saved != self.step:
            self.ckpt.save_async(self.step)
        val = self.evaluate()
        self.ckpt.finalize()
        self.metrics.log({"step": self.step, "val_loss": val})
        self.metrics.write(
            f"done: {self.step} steps in {time.perf_counter() - start:.1f}s, val_loss {val:.4f}"
        )
        return {**last, "val_loss": val}

    def close(self) -> None:
        self.ckpt.finalize()
        self.metrics.close()
        if self.is_rank0 and self.job.logging.plot and self.metrics.path.exists():
            plot_loss(self.metrics.path, self.run_dir / "loss.png")
        if dist.is_initialized():
            # Leave together: a rank that exits while a peer still talks to it aborts the peer.
            dist.barrier()
            dist.destroy_process_group()
