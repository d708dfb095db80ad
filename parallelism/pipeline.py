"""Pipeline parallelism for the plain GPT on ``torch.distributed.pipelining``.

Owns: splitting the model into ``pp x pp_virtual`` stages that keep the original parameter names
(torchtitan's ``pipeline_llama_manual_split``: delete the blocks a stage does not own from the
``layers`` ModuleDict, set ``tok_embeddings``/``norm``/``output`` to ``None`` where not owned),
the stage -> rank assignment (Megatron's interleaved "looped" placement: rank r holds stages
r, r+pp, r+2pp, ...; Narayanan et al., 2021), building ``PipelineStage`` + ``ScheduleGPipe`` /
``Schedule1F1B`` / ``ScheduleInterleaved1F1B``, and the checks that must pass before launch.

Loss scaling is the trainer's: each micro-batch contributes ``mean_token_loss / n_micro`` and the
schedule is built with ``scale_grads=False`` (torch's default divides again, the accumulation bug
torchtitan users hit); data-parallel reduction then averages over ranks. The loss lives on the last
stage only, so it is summed over the pp group (zeros elsewhere) for logging.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallelism.dims import LayoutError, ParallelDims

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def num_microbatches(job: Any, dims: ParallelDims) -> int:
    """Pipeline micro-batches per step: ``parallel.pp_microbatches`` or the trainer's count."""
    t = job.train
    per_rank = t.global_batch_size // max(1, dims.dp)
    return job.parallel.pp_microbatches or max(1, per_rank // t.micro_batch_size)


def validate_pipeline(job: Any, dims: ParallelDims) -> None:
    """Reject pipeline layouts that cannot run (or would hang) before any process group exists."""
    p, pp = job.parallel, dims.pp
    if p.pp_schedule not in SCHEDULES:
        raise LayoutError(f"parallel.pp_schedule={p.pp_schedule!r}: use one of {SCHEDULES}")
    if p.pp_virtual < 1:
        raise LayoutError(f"parallel.pp_virtual={p.pp_virtual} must be >= 1")
    if pp == 1:
        return
    v = p.pp_virtual
    if v > 1 and p.pp_schedule != "interleaved_1f1b":
        raise LayoutError(
            f"parallel.pp_virtual={v} needs parallel.pp_schedule=interleaved_1f1b "
            f"(got {p.pp_schedule!r}); set pp_virtual=1 for gpipe/1f1b"
        )
    n_layers = job.model.n_layers
    if n_layers % (pp * v):
        raise LayoutError(
            f"model.n_layers={n_layers} is not divisible by parallel.pp x parallel.pp_virtual = "
            f"{pp} x {v} = {pp * v}: every stage must hold the same number of blocks"
        )
    per_rank = job.train.global_batch_size // max(1, dims.dp)
    m = num_microbatches(job, dims)
    if per_rank % m:
        raise LayoutError(
            f"parallel.pp_microbatches={m} does not divide the per-data-parallel-rank batch "
            f"{per_rank} (train.global_batch_size / dp): uneven micro-batches hang the pipeline"
        )
    if m < pp:
        raise LayoutError(
            f"{m} pipeline micro-batches < parallel.pp={pp} stages: raise "
            "train.global_batch_size or parallel.pp_microbatches, or lower "
            "train.micro_batch_size (torch pipelining hangs otherwise)"
        )
    if p.pp_schedule == "interleaved_1f1b" and m % pp:
        raise LayoutError(
            f"parallel.pp_schedule=interleaved_1f1b needs micro-batches ({m}) to be a multiple "
            f"of parallel.pp={pp}: adjust parallel.pp_microbatches or train.global_batch_size"
        )
    if job.model.tie_embeddings:
        raise LayoutError(
            "model.tie_embeddings=true is not supported with parallel.pp>1 (the first and last "
            "stage would have to reduce the shared weight's gradient): set "
            "model.tie_embeddings=false or parallel.pp=1"
        )


def stage_indices(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """Stages held by pipeline rank ``pp_rank`` (looped placement)."""
    return [pp_rank + i * pp for i in range(virtual)]


def split_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """A copy of the (meta-device) GPT that keeps only stage ``stage``'s blocks, same FQNs."""
    part = copy.deepcopy(model)
    keys = list(part.layers.keys())
    per = len(keys) // n_stages
    keep = set(keys[stage * per : (stage + 1) * per])
    for k in keys:
        if k not in keep:
            del part.layers[k]
    if stage != 0:
        part.tok_embeddings = None
    if stage != n_stages - 1:
        part.norm = None
        part.output = None
    return part


class PipelinedGPT(nn.Module):
    """This rank's pipeline stages (model chunks), presented as one module.

    The stages' submodules are registered here under the plain model's names (``tok_embeddings``,
    ``layers.<i>``, ``norm``, ``output``), so ``named_parameters``/``state_dict`` and tools that
    walk the module tree by FQN (DCP's ``get_model_state_dict``, our checkpoints, initialisation)
    see exactly the names of the unsplit model. The stage modules themselves (which the schedule
    runs and FSDP wraps) are kept in a plain list, not registered twice.
    """

    def __init__(self, parts: list[nn.Module], stages: list[int], n_stages: int) -> None:
        super().__init__()
        object.__setattr__(self, "parts", list(parts))
        self.stage_ids = stages
        self.n_stages = n_stages
        self.refresh()

    def refresh(self) -> None:
        """(Re-)register the stages' current submodules; call after parallelizing the stages
        (tensor parallelism may replace the embedding/output, wrappers replace blocks)."""
        self.layers = nn.ModuleDict()
        for part in self.parts:
            self.layers.update(part.layers)
            for name in ("tok_embeddings", "norm", "output"):
                if getattr(part, name, None) is not None:
                    setattr(self, name, getattr(part, name))

    def init_tensor(self, name: str, shape: tuple[int, ...], gen: torch.Generator):
        return self.parts[0].init_tensor(name, shape, gen)

    def _apply(self, fn: Any, recurse: bool = True) -> PipelinedGPT:
        # to_empty()/to() must go through the stage modules: FSDP2 wraps them and re-registers
        # its sharded parameters in their _apply; reaching a child directly would bypass that.
        for part in self.parts:
            part._apply(fn, recurse)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "a pipelined model runs through its schedule (build_schedule), not model(x)"
        )


def split_model(model: nn.Module, dims: ParallelDims, virtual: int) -> PipelinedGPT:
    """Split the meta-device model into this rank's stages."""
    pp_rank = dims.coordinate(dist.get_rank())["pp"]
    n_stages = dims.pp * virtual
    ids = stage_indices(pp_rank, dims.pp, virtual)
    return PipelinedGPT([split_stage(model, s, n_stages) for s in ids], ids, n_stages)


@dataclass(frozen=True)
class StageShapes:
    """What crosses a stage boundary, declared up front (torch's *static* stage metadata).

    Without it torch infers each stage's output by running its forward once on
    ``torch.empty`` inputs it materialises from the previous stage's shapes. Those
    uninitialised values differ between the tensor/expert-parallel ranks of one stage, so an
    MoE stage routes them differently on each rank and its expert collectives disagree in size
    (gloo: "Received data size doesn't match expected size"): the crash of the 8-rank
    ``gpt_moe tp=2 ep=2 dp_shard=2 pp=2`` run. Declared shapes also skip that extra forward.

    Activations between stages are fp32 whatever ``train.dtype``: parameters stay fp32
    (autocast computes in bf16, and the residual add promotes back to fp32).
    """

    micro_batch: int
    seq_local: int
    """This rank's sequence slice (Ulysses)."""
    hidden_seq: int
    """Sequence length of a hidden state (``seq_local / tp`` with sequence-parallel norms)."""
    dim: int
    vocab_padded: int
    extras: tuple[str, ...]
    """What a stage passes on beside the hidden state (``GPT.stage_extras``)."""

    @classmethod
    def of(cls, job: Any, dims: ParallelDims, micro_batch: int, model: nn.Module) -> StageShapes:
        output = getattr(model, "output", None)  # on this rank only if it holds the last stage
        seq_local = job.train.seq_len // dims.sp
        sp_norms = dims.tp > 1 and job.parallel.sequence_parallel_norms
        return cls(
            micro_batch,
            seq_local,
            seq_local // dims.tp if sp_norms else seq_local,
            job.model.dim,
            output.weight.shape[0] if output is not None else 0,  # global (padded) rows
            model.parts[0].stage_extras,
        )

    def _ids(self) -> torch.Tensor:
        """(mb, seq) int64: the first stage's token ids, and an MoE's token keys."""
        return torch.empty(self.micro_batch, self.seq_local, dtype=torch.long, device="meta")

    def _hidden(self, grad: bool) -> tuple[torch.Tensor | None, ...]:
        """The boundary: hidden state, then the model's extras (the MoE's token keys and
        balancing loss). ``grad=True``: their gradients (none for the integer keys)."""
        h = torch.empty(self.micro_batch, self.hidden_seq, self.dim, device="meta")
        out: list[torch.Tensor | None] = [h.requires_grad_(not grad)]
        for kind in self.extras:
            if kind == "keys":
                out.append(None if grad else self._ids())
            else:
                out.append(torch.empty((), device="meta").requires_grad_(not grad))
        return tuple(out)

    def _logits(self, dims: ParallelDims) -> torch.Tensor:
        shape = (self.micro_batch, self.seq_local, self.vocab_padded // dims.tp)
        local = torch.empty(shape, device="meta", requires_grad=True)
        if dims.tp == 1:
            return local
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, dims.mesh["tp"], [Shard(-1)], run_check=False)

    def stage_args(self, stage: int, n_stages: int, dims: ParallelDims) -> dict[str, Any]:
        """``PipelineStage`` keyword arguments: example inputs/outputs and their gradients."""
        first, last = stage == 0, stage == n_stages - 1
        inputs = (self._ids(), self._ids()) if "keys" in self.extras else (self._ids(),)
        return {
            "input_args": inputs if first else self._hidden(False),
            "output_args": (self._logits(dims),) if last else self._hidden(False),
            "input_grads": (None,) * len(inputs) if first else self._hidden(True),
            "output_grads": (None,) if last else self._hidden(True),
        }


@dataclass
class PipelineSchedule:
    """A built torch pipeline schedule and what running it needs to know (the trainer runs
    it: ``schedule.step(*inputs, target=..., losses=...)`` on every pipeline rank)."""

    schedule: Any
    """``ScheduleGPipe`` / ``Schedule1F1B`` / ``ScheduleInterleaved1F1B``."""
    pp_group: dist.ProcessGroup
    has_first: bool
    """This rank holds the first stage (feeds the inputs)."""
    has_last: bool
    """This rank holds the last stage (computes the loss)."""
    n_micro: int


def build_schedule(
    model: PipelinedGPT, dims: ParallelDims, job: Any, loss_fn: Any, device: Any, start: int
) -> PipelineSchedule:
    """The schedule ``parallel.pp_schedule`` names over this rank's stages.

    Args:
        loss_fn: ``(output, target) -> mean loss`` of one micro-batch (scaled by ``1/n_micro``
            here: ``scale_grads=False``, see the module docstring).
        start: global position of this rank's first token (its Ulysses slice), given to every
            stage, since stages receive hidden states without positions.
    """
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    pp_group = dims.mesh["pp"].get_group()
    n = num_microbatches(job, dims)
    per_rank = job.train.global_batch_size // max(1, dims.dp)
    io = StageShapes.of(job, dims, per_rank // n, model)
    # The last stage's logits get no gradient from a next stage (the loss is computed there):
    # torch warns about exactly that legal case for every static last stage.
    warnings.filterwarnings("ignore", message=r"Stage \d+: output_args\[0\] has requires_grad")
    stages = [
        PipelineStage(
            part,
            s,
            model.n_stages,
            device,
            group=pp_group,
            **io.stage_args(s, model.n_stages, dims),
        )
        for part, s in zip(model.parts, model.stage_ids)
    ]
    for part in model.parts:
        part.position_offset = start

    def micro_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(out, y) / n

    kind = job.parallel.pp_schedule
    if kind == "interleaved_1f1b":
        schedule = ScheduleInterleaved1F1B(stages, n, loss_fn=micro_loss, scale_grads=False)
    else:
        cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
        schedule = cls(stages[0], n, loss_fn=micro_loss, scale_grads=False)
    return PipelineSchedule(
        schedule,
        pp_group,
        any(s.is_first for s in stages),
        any(s.is_last for s in stages),
        n,
    )
