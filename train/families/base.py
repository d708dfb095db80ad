"""The contract between the one ``Trainer`` and a model family (torchtitan's ``TrainSpec``).

The trainer (``train/trainer.py``) owns what every run has: the process group, the optimizer and
its schedule, clipping, checkpoints, the step counter, logging and the loop. A ``Family`` owns
what differs between model families: its typed args, validation, how the model is built and
parallelized, its data loaders, one step's forward/backward and loss, evaluation, extra metrics
and the checkpoint adapter (the logical metadata of its tensors). One instance serves one run.

Refusals: ``refuses`` maps a config field a family cannot honour to the reason; ``plan_run``
fails before launch when such a field differs from its default, naming the field. Nothing is
ignored silently (``tests/unit/test_config_fields.py`` enumerates every field x family).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from checkpoint.adapter import CheckpointAdapter
from parallelism.dims import ParallelDims
from parallelism.utils import clip_grad_norm_
from train.config import ModelArgs
from train.flops import FlopCount


class Family:
    """One model family. Subclasses set the class attributes and override the hooks."""

    name: ClassVar[str]
    args: ClassVar[type[ModelArgs]]
    """The family's typed ``model.*`` schema."""
    refuses: ClassVar[dict[str, str]] = {}
    """``"group.field"`` -> why this family cannot honour a non-default value."""
    unit: ClassVar[str] = "tokens"
    """What the throughput counts (``tokens`` or ``samples``)."""

    def __init__(self, job: Any, dims: ParallelDims, rank: int) -> None:
        self.job, self.dims, self.rank = job, dims, rank
        self.device = torch.device("cpu")
        self.step = 0
        """The optimizer step ``forward_backward`` computes (the trainer sets it; e.g. the MoE
        router's noise is keyed by it)."""

    # -- before launch ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise a one-line ``ConfigError`` / ``LayoutError`` / ``DataError`` for bad input."""

    def resolved_config(self) -> dict[str, Any]:
        """Config values ``validate`` derived (e.g. ``model.vocab_size`` from the data), written
        into the saved config so a checkpoint records what was built."""
        return {}

    def prepare(self) -> None:
        """Prepare or check the data before launch (e.g. tokenize the stdlib corpus once)."""

    def use_cuda(self) -> bool:
        """Whether this run puts the model on the local GPU (when one exists)."""
        return torch.cuda.is_available() and self.job.parallel.backend != "gloo"

    # -- build ----------------------------------------------------------------------------------
    def build_model(self, device: torch.device, saved: Any = None) -> nn.Module:
        """The parallelized, initialised model. ``saved``: this family's extra state from the
        checkpoint being resumed (``state_dict``), or None."""
        raise NotImplementedError

    def build_loaders(self) -> tuple[Any, Any]:
        """(train loader, validation loader); the train loader is checkpoint state."""
        raise NotImplementedError

    def checkpoint_adapter(self, model: nn.Module) -> CheckpointAdapter:
        return CheckpointAdapter()

    def state_dict(self) -> dict | None:
        """JSON-able family state saved with every checkpoint (e.g. DMT's tower plan)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Check a resumed checkpoint's family state against this run (built from it)."""

    # -- one step -------------------------------------------------------------------------------
    @contextmanager
    def autocast(self) -> Iterator[None]:
        """``train.dtype=bf16``: autocast the forward (weights and optimizer stay fp32)."""
        with ExitStack() as stack:
            if self.job.train.dtype == "bf16":
                stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
            yield

    def forward_backward(self, model: nn.Module, micro_batches: list) -> torch.Tensor:
        """Accumulate this rank's gradients of one global batch; returns its local loss."""
        raise NotImplementedError

    def reduce_gradients(self, model: nn.Module) -> None:
        """Gradient reduction the model does not do itself (after backward, before clipping)."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float, pipeline_group: Any) -> Any:
        """Global gradient norm (every shard counted once), clipped to ``max_norm``."""
        return clip_grad_norm_(model.parameters(), max_norm, pipeline_group)

    def grad_norm(self, model: nn.Module) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        """The global gradient norm without clipping, for an optimizer that clips itself
        (offload): ``params -> 0-d tensor``, identical on every rank."""
        group = getattr(self, "pipeline_group", None)
        return lambda params: clip_grad_norm_(params, 0.0, group)

    def global_loss(self, local: torch.Tensor) -> float:
        """The logged loss of a step from this rank's ``forward_backward`` result."""
        raise NotImplementedError

    def items_per_step(self) -> int:
        """Tokens or samples one optimizer step consumes (for throughput)."""
        return self.job.train.global_batch_size

    def flops_per_step(self) -> FlopCount | None:
        """Analytic model and hardware FLOPs of one global step, forward + backward
        (``train/flops.py``; called after ``build_model``); None: not known, nothing logged."""
        return None

    # -- evaluation and metrics -----------------------------------------------------------------
    def evaluate(self, model: nn.Module, val_loader: Any) -> dict:
        """Validation metrics (same on every rank), e.g. ``{"val_loss": ...}``."""
        raise NotImplementedError

    def metrics(self, model: nn.Module) -> dict:
        """Extra fields for each logged training record."""
        return {}

    def describe(self, model: nn.Module) -> str:
        n = sum(p.numel() for p in model.parameters())
        return f"{type(model).__name__} ({n / 1e6:.2f}M local params)"

    def layout(self) -> dict:
        """The layout recorded in checkpoints (informational)."""
        names = ("pp", "dp_replicate", "dp_shard", "sp", "tp")
        return dict(zip(names, self.dims.mesh_shape))
