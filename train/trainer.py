"""The one training loop, for every model family: build, train, validate, log, checkpoint.

Everything that can be wrong with the input is checked by ``plan_run`` before any process group
exists, and reported as one line (``models.errors``): the generic fields here, the family's in
its ``Family.validate``, and every field a family cannot honour (``Family.refuses``) refused
when set. The loop itself holds no parallel math and no family code: building, data, one step's
forward/backward, evaluation and metrics come from the family (``train/families/``), every
parallel transformation from ``parallelism/``.

The trainer is checkpoint state: step, data position, scheduler, RNG, optimizer, and the
family's extra state (e.g. DMT's tower plan), saved lazily and resumed on any layout
(``checkpoint.Manager``; docs/architecture.md has the data flow of one step).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from checkpoint import Manager, validate_checkpoint_args
from models.errors import ConfigError, LayoutError
from offload.build import validate_offload_args
from parallelism.dims import ParallelDims, dims_from_config
from train.config import JobConfig
from train.families import get_family
from train.families.base import Family
from train.fields import refuse_ignored
from train.flops import peak_memory_gib, resolve_peak, throughput_metrics
from train.kernels import apply_fused_rmsnorm, build_apex_fused_adam, describe_kernels
from train.metrics import MetricsLogger, plot_loss
from train.optional import check_optional_packages
from train.ranges import check_ranges
from train.rendezvous import init_process_group
from train.runlock import RunDirBusy, RunLocks
from train.signals import (
    Preempted,
    PreemptionFlag,
    agent_of_this_process,
    clear_marker,
    write_marker,
)
from train.watchdog import HangWatchdog


@dataclass
class RunPlan:
    """Everything decided before processes talk to each other."""

    dims: ParallelDims
    family: Family
    """This run's model family (validated, its data prepared)."""
    n_micro: int
    rank: int
    local_rank: int


def _check_loop_fields(job: JobConfig, dims: ParallelDims) -> None:
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
    if job.optim.name != "adamw":
        raise ConfigError(f"optim.name={job.optim.name!r}: only adamw is implemented")
    if job.parallel.backend not in ("auto", "gloo", "nccl"):
        raise LayoutError(f"parallel.backend={job.parallel.backend!r}: use auto, gloo or nccl")


def field_value(job: Any, key: str) -> Any:
    """``job``'s value of ``"group.field"``."""
    group, name = key.split(".", 1)
    return getattr(getattr(job, group), name)


def default_value(key: str) -> Any:
    """The schema default of ``"group.field"`` (outside ``model.*``)."""
    return field_value(JobConfig(), key)


def refuse_unsupported(job: JobConfig, family: type[Family]) -> None:
    """Every field the family cannot honour fails when set (nothing is ignored silently)."""
    for key, why in family.refuses.items():
        value, default = field_value(job, key), default_value(key)
        if value != default:
            raise ConfigError(
                f"{key}={value} is not supported for model.name={family.name} ({why}): "
                f"remove the override (default {default!r})"
            )


def _check_offload_layout(job: JobConfig, dims: ParallelDims) -> None:
    validate_offload_args(job.offload)
    if job.offload.kind == "none":
        return
    for name in ("tp", "pp", "sp", "ep"):
        if getattr(dims, name) > 1:
            raise LayoutError(
                f"offload.kind={job.offload.kind} with parallel.{name}={getattr(dims, name)} "
                "is not supported yet: offload composes with data parallelism only"
            )


def validate_layout(job: JobConfig, dims: ParallelDims, rank: int = 0) -> Family:
    """Every check of the config against the layout, the family and the model that needs
    neither the data nor a process group (``plan_run`` and ``python -m train.plan`` share it,
    so an invalid layout fails with the same line in both)."""
    _check_loop_fields(job, dims)
    check_ranges(job)
    family_cls = get_family(job.model)
    refuse_unsupported(job, family_cls)
    refuse_ignored(job, dims, JobConfig())
    family = family_cls(job, dims, rank)
    family.validate()
    validate_checkpoint_args(job.checkpoint)
    _check_offload_layout(job, dims)
    return family


def plan_run(job: JobConfig) -> RunPlan:
    """Validate the config against the world size, the family and the data, and prepare the
    data; no process group is created."""
    dims = dims_from_config(job.parallel)
    rank = int(os.environ.get("RANK", "0"))
    family = validate_layout(job, dims, rank)
    check_optional_packages(job)  # data.backend=dali / optim.impl=apex_fused_adam installed?
    family.prepare()
    n_micro = job.train.global_batch_size // (job.train.micro_batch_size * dims.dp)
    return RunPlan(dims, family, n_micro, rank, int(os.environ.get("LOCAL_RANK", "0")))


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


def build_run_optimizer(model: nn.Module, job: JobConfig, family: Family) -> Any:
    """AdamW, or the offload optimizer (it clips with the family's global norm)."""
    if job.offload.kind == "none":
        return build_optimizer(model, job.optim)
    from offload import build_offload_optimizer

    return build_offload_optimizer(model, job.optim, job.offload, family.grad_norm(model))


class Trainer:
    """Owns the process group, model, optimizer, data, checkpoints and metrics of one run."""

    def __init__(self, job: JobConfig, cfg: DictConfig, plan: RunPlan) -> None:
        self.job, self.plan, self.dims = job, plan, plan.dims
        self.family = plan.family
        self.step = 0
        self.device = self._init_distributed()
        self.is_rank0 = plan.rank == 0
        self.run_dir = Path(job.run.dir)
        self.locks = RunLocks()
        self._lock_dirs()
        try:
            self._build(cfg)
        except BaseException:
            self.locks.release()
            raise

    def _build(self, cfg: DictConfig) -> None:
        job = self.job
        for key, value in self.family.resolved_config().items():
            OmegaConf.update(cfg, key, value)
        if self.is_rank0:
            clear_marker(self.run_dir)  # a new launch: an earlier preemption is resumed now
            OmegaConf.save(cfg, self.run_dir / "config.yaml")
        self.ckpt = Manager(
            job.checkpoint,
            self.run_dir,
            config=OmegaConf.to_container(cfg, resolve=True),
            layout=self.family.layout(),
        )
        torch.manual_seed(job.train.seed)
        self.model = self.family.build_model(self.device, self.ckpt.saved_extra())
        self.fused_norms = apply_fused_rmsnorm(self.model) if self.dims.tp == 1 else 0
        self.flops = self.family.flops_per_step()
        self.peak_tflops = resolve_peak(job.train.peak_tflops, job.train.dtype, self.device)
        self.optimizer = build_run_optimizer(self.model, job, self.family)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(job.train.warmup_steps, job.train.steps, job.optim.min_lr_ratio),
        )
        self.train_loader, self.val_loader = self.family.build_loaders()
        self.step = self.ckpt.maybe_resume(
            self.model,
            self.optimizer,
            self.scheduler,
            self.train_loader,
            adapter=self.family.checkpoint_adapter(self.model),
            extra=self.family,
        )
        self.metrics = MetricsLogger(
            self.run_dir,
            self.is_rank0,
            job.train.steps,
            job.logging.progress,
            job.logging.wandb_project if job.logging.wandb else None,
            OmegaConf.to_container(cfg) if job.logging.wandb else None,
            append=self.step > 0,
            unit=self.family.unit,
        )
        self.preempt = PreemptionFlag()
        hang_s = job.parallel.hang_timeout_s if self.distributed else 0.0
        self.watchdog = HangWatchdog(self.run_dir, self.plan.rank, self.dims.world_size, hang_s)

    # -- set-up -------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.dims.world_size > 1

    def _lock_targets(self) -> list[tuple[Path, str]]:
        dirs = [(self.run_dir, "run.dir")]
        ckpt = self.job.checkpoint
        if ckpt.dir and ckpt.enabled:
            root = Path(ckpt.dir).resolve()
            if not root.is_relative_to(self.run_dir.resolve()):
                dirs.append((root, "checkpoint.dir"))
        return dirs

    def _lock_dirs(self) -> None:
        """Rank 0 takes the run (and checkpoint) directory locks; every rank learns the
        result, so a second job on the same folders stops whole, naming the holder."""
        error = None
        if self.is_rank0:
            try:
                self.locks.acquire(self._lock_targets())
            except RunDirBusy as exc:
                error = str(exc)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.distributed:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise RunDirBusy(error)

    def _init_distributed(self) -> torch.device:
        p = self.job.parallel
        use_cuda = self.family.use_cuda()
        device = torch.device("cuda", self.plan.local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if self.distributed and not dist.is_initialized():
            backend = p.backend if p.backend != "auto" else ("nccl" if use_cuda else "gloo")
            init_process_group(backend, timedelta(seconds=p.timeout_s))
        if self.distributed:
            self.dims.build_mesh(device.type)
        return device

    # -- one step -----------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step: forward/backward over the global batch, reduction, clipping,
        update. Returns (this rank's loss, the global gradient norm)."""
        family, model, beat = self.family, self.model, self.watchdog.beat
        self.optimizer.zero_grad(set_to_none=True)
        family.step = self.step
        beat(self.step, "forward_backward")
        loss = family.forward_backward(model, self.train_loader.next_batch())
        beat(self.step, "reduce_gradients")
        family.reduce_gradients(model)
        beat(self.step, "checkpoint snapshot wait")
        self.ckpt.wait_before_update()  # a lazy snapshot must be on the host before weights change
        beat(self.step, "optimizer step")
        if getattr(self.optimizer, "owns_grad_clip", False):
            self.optimizer.step()  # offload: global norm, clip and overflow skip inside
            grad_norm = self.optimizer.last_grad_norm
        else:
            clip = self.job.optim.grad_clip
            grad_norm = family.clip_grad_norm(model, clip, getattr(family, "pipeline_group", None))
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss, grad_norm

    def evaluate(self) -> dict:
        return self.family.evaluate(self.model, self.val_loader)

    # -- loop ---------------------------------------------------------------------------------
    def _should_log(self) -> bool:
        every = self.job.logging.every
        return (
            self.step == 1
            or self.step == self.job.train.steps
            or (every > 0 and self.step % every == 0)
        )

    def _record(self, loss: torch.Tensor, grad_norm: torch.Tensor, dt: float, start: float):
        rate = self.family.items_per_step() / dt
        record = {
            "step": self.step,
            "loss": self.family.global_loss(loss),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            f"{self.family.unit}_per_s": rate,
            "step_time_s": dt,
            "elapsed_s": time.perf_counter() - start,
            **throughput_metrics(self.flops, dt, self.dims.world_size, self.peak_tflops),
            "peak_mem_gib": self._peak_memory_gib(),
        }
        record.update(self.family.metrics(self.model))
        self.metrics.log(record)
        self.metrics.progress(self.step, record["loss"], rate, record)
        return record

    def _peak_memory_gib(self) -> float:
        """The largest peak memory of any rank (``train.flops.peak_memory_gib``)."""
        mem = torch.tensor([peak_memory_gib(self.device)], device=self.device)
        if self.distributed:
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        return float(mem.item())

    def _header(self) -> None:
        self.metrics.write(
            f"run {self.job.run.name} ({self.run_dir}) | model: "
            f"{self.family.describe(self.model)} | layout: {self.family.layout()} | "
            f"micro-batches/step: {self.plan.n_micro}"
        )
        self.metrics.write(describe_kernels(self.job, self.fused_norms))
        if self.flops is not None:
            peak = f"{self.peak_tflops:g} TFLOP/s" if self.peak_tflops else "unknown (no MFU)"
            self.metrics.write(
                f"model FLOPs/step: {self.flops.model:.4g} (causal attention at half cost), "
                f"hardware {self.flops.hardware:.4g}; peak per rank: {peak}"
            )

    def _preempt_signal(self) -> int:
        """The preemption signal any rank received (0: none); all ranks agree."""
        flag = torch.tensor([self.preempt.signum or 0], device=self.device)
        if self.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def _stop_preempted(self, signum: int) -> None:
        """Checkpoint the current step, record the preemption, and raise ``Preempted``."""
        name = signal.Signals(signum).name
        self.watchdog.beat(self.step, f"preemption checkpoint ({name})")
        if self.job.checkpoint.enabled:
            if self.ckpt.last_saved != self.step:
                self.ckpt.save_async(self.step)
            self.ckpt.finalize()
            saved = f"checkpoint of step {self.step} saved in {self.ckpt.root}"
        else:
            saved = "checkpoint.enabled=false, so nothing was saved and a relaunch starts over"
        agents = [agent_of_this_process()]
        if self.distributed:
            agents = [None] * self.dims.world_size
            dist.all_gather_object(agents, agent_of_this_process())
        if self.is_rank0:
            write_marker(self.run_dir, self.step, name, agents)
        raise Preempted(
            f"preempted by {name} at step {self.step}: {saved}; relaunch the same command to "
            f"resume (launch/slurm.sbatch requeues)"
        )

    def fit(self) -> dict:
        """Train ``train.steps`` steps; returns the last logged record and the final metrics.

        SIGTERM/SIGUSR1 during the loop checkpoint the current step and raise ``Preempted``;
        a rank without progress for ``parallel.hang_timeout_s`` ends the job (watchdog)."""
        self.preempt.install()
        self.watchdog.start()
        try:
            return self._fit()
        finally:
            self.watchdog.stop()
            self.preempt.restore()

    def _fit(self) -> dict:
        t, beat = self.job.train, self.watchdog.beat
        self._header()
        start, last = time.perf_counter(), {}
        while self.step < t.steps:
            t0 = time.perf_counter()
            loss, grad_norm = self.train_step()
            beat(self.step, "logging")
            if self._should_log():
                last = self._record(loss, grad_norm, time.perf_counter() - t0, start)
            if self.ckpt.due(self.step):
                beat(self.step, "checkpoint save")
                self.ckpt.save_async(self.step)
            signum = self._preempt_signal()
            if signum:
                self._stop_preempted(signum)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                beat(self.step, "evaluation")
                self.metrics.log({"step": self.step, **self.evaluate()})
            if t.max_time_s and time.perf_counter() - start > t.max_time_s:
                self.metrics.write(f"stopping at step {self.step}: train.max_time_s reached")
                break
        beat(self.step, "final checkpoint and evaluation")
        if self.ckpt.due(self.step, final=True) and self.ckpt.last_saved != self.step:
            self.ckpt.save_async(self.step)
        final = self.evaluate()
        self.ckpt.finalize()
        self.metrics.log({"step": self.step, **final})
        summary = ", ".join(f"{k} {v:.4f}" for k, v in final.items())
        self.metrics.write(
            f"done: {self.step} steps in {time.perf_counter() - start:.1f}s, {summary}"
        )
        return {**last, **final}

    def close(self) -> None:
        self.watchdog.stop()
        self.ckpt.finalize()
        self.metrics.close()
        if self.is_rank0 and self.job.logging.plot and self.metrics.path.exists():
            plot_loss(self.metrics.path, self.run_dir / "loss.png")
        if dist.is_initialized():
            # Leave together: a rank that exits while a peer still talks to it aborts the peer.
            dist.barrier()
        self.locks.release()
        if dist.is_initialized():
            dist.destroy_process_group()
