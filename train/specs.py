"""Model specs: bind a model family to its builder, parallelizer and loss (torchtitan's
TrainSpec), so the trainer never imports a concrete model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from parallelism.dims import LayoutError, ParallelDims


@dataclass
class ModelSpec:
    """How to build, parallelize, initialise and score one model family."""

    name: str
    build: Callable[[object], nn.Module]
    parallelize: Callable[[nn.Module, ParallelDims, object], nn.Module]
    finalize: Callable[[nn.Module, ParallelDims], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]
    validate: Callable[[object, ParallelDims], None]
    metrics: Callable[[nn.Module], dict] | None = None
    """Optional extra fields for each logged metrics record (e.g. MoE expert load)."""
    trainer: Callable[[], type] | None = None
    """Optional: returns the loop class to run instead of the token ``Trainer`` (same
    ``__init__(job, cfg, plan)``/``fit``/``close`` interface); such a family also skips the
    token-data preparation in ``plan_run``."""

    def build_and_parallelize(
        self, job: object, dims: ParallelDims, device: torch.device
    ) -> nn.Module:
        """Meta-device build -> parallelize -> materialise + seeded init -> post-init wrappers."""
        from parallelism.init import materialize_and_init_

        with torch.device("meta"):
            model = self.build(job.model)
        model = self.parallelize(model, dims, job)
        materialize_and_init_(model, job.train.seed, device)
        return self.finalize(model, dims)

    @staticmethod
    def describe(model: nn.Module) -> str:
        n = sum(p.numel() for p in model.parameters())
        return f"{type(model).__name__} ({n / 1e6:.2f}M local params)"


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor, job: object) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; vocabulary padding never enters the softmax."""
    if isinstance(logits_BSV, DTensor):  # vocab-parallel logits (tensor parallelism)
        from parallelism.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits_BSV, targets_BS, job.model.vocab_size)
    logits = logits_BSV[..., : job.model.vocab_size]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets_BS.flatten())


def nearest_divisor(n: int, k: int) -> int:
    """The divisor of ``n`` closest to ``k`` (the smaller one on a tie): a suggested fix."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def validate_gpt(job: object, dims: ParallelDims) -> None:
    m = job.model
    n_kv = m.n_kv_heads or m.n_heads
    if m.dim % m.n_heads:
        raise LayoutError(
            f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}: set model.n_heads "
            f"to a divisor of {m.dim} (e.g. {nearest_divisor(m.dim, m.n_heads)}) or change model.dim"
        )
    if m.n_heads % n_kv:
        raise LayoutError(
            f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={n_kv}: set "
            f"model.n_kv_heads to a divisor of {m.n_heads} (e.g. {nearest_divisor(m.n_heads, n_kv)})"
        )
    if job.train.seq_len > m.max_seq_len:
        raise LayoutError(
            f"train.seq_len={job.train.seq_len} exceeds model.max_seq_len={m.max_seq_len}: "
            "lower train.seq_len or raise model.max_seq_len"
        )
    from parallelism.ulysses import validate_ulysses

    validate_ulysses(m.n_heads, n_kv, dims.tp, dims.sp, job.train.seq_len)
    for name in ("tp", "pp", "sp", "ep"):
        if getattr(dims, name) > 1 and name not in SUPPORTED_MODEL_PARALLEL:
            raise LayoutError(
                f"parallel.{name}={getattr(dims, name)} is not supported yet for model.name=gpt"
            )
    from parallelism.pipeline import validate_pipeline
    from parallelism.tensor_parallel import validate_tensor_parallel

    validate_tensor_parallel(job, dims.tp)
    validate_pipeline(job, dims)


SUPPORTED_MODEL_PARALLEL: set[str] = {"tp", "pp", "sp"}


def _gpt_spec() -> ModelSpec:
    from models.gpt import build_gpt
    from parallelism.parallelize_gpt import finalize_data_parallel, parallelize_gpt

    return ModelSpec(
        "gpt", build_gpt, parallelize_gpt, finalize_data_parallel, lm_loss, validate_gpt
    )


def _gpt_moe_spec() -> ModelSpec:
    from models.moe import build_gpt_moe
    from parallelism.parallelize_gpt import finalize_data_parallel
    from parallelism.parallelize_gpt_moe import parallelize_gpt_moe
    from train.moe_spec import moe_lm_loss, moe_metrics, validate_gpt_moe

    return ModelSpec(
        "gpt_moe",
        build_gpt_moe,
        parallelize_gpt_moe,
        finalize_data_parallel,
        moe_lm_loss,
        validate_gpt_moe,
        moe_metrics,
    )


def _recsys_spec(name: str) -> Callable[[], ModelSpec]:
    """DLRM / DMT: built, sharded and trained by ``train/recsys.py`` (see docs/dmt.md)."""

    def make() -> ModelSpec:
        from train.recsys import RecsysTrainer, validate_recsys

        def unused(*_: object) -> None:
            raise NotImplementedError("recommender models are built by train/recsys.py")

        return ModelSpec(
            name, unused, unused, unused, unused, validate_recsys, trainer=lambda: RecsysTrainer
        )

    return make


MODEL_SPECS: dict[str, Callable[[], ModelSpec]] = {
    "gpt": _gpt_spec,
    "gpt_moe": _gpt_moe_spec,
    "dlrm": _recsys_spec("dlrm"),
    "dmt": _recsys_spec("dmt"),
}


def get_model_spec(name: str) -> ModelSpec:
    if name not in MODEL_SPECS:
        raise LayoutError(f"model.name={name!r} is unknown: choose one of {sorted(MODEL_SPECS)}")
    return MODEL_SPECS[name]()
