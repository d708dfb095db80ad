"""The ``gpt_moe`` model family's loss, validation and metrics (bound in ``train.specs``)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from parallelism.dims import LayoutError, ParallelDims
from train.specs import lm_loss, validate_gpt


def moe_lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor, job: object) -> torch.Tensor:
    """Next-token cross-entropy plus ``aux_loss_coef`` x the global balancing loss (summed over
    MoE layers; carried on the logits as ``moe_aux_loss`` by a training forward)."""
    loss = lm_loss(logits_BSV, targets_BS, job)
    aux = getattr(logits_BSV, "moe_aux_loss", None)
    if aux is not None and job.model.aux_loss_coef:
        loss = loss + job.model.aux_loss_coef * aux
    return loss


def validate_gpt_moe(job: object, dims: ParallelDims) -> None:
    """The dense checks (with ep allowed) plus the MoE fields against the layout."""
    m = job.model
    validate_gpt(job, dataclasses.replace(dims, ep=1))
    if m.router not in ("sparsemixer", "softmax"):
        raise LayoutError(f"model.router={m.router!r}: use 'sparsemixer' or 'softmax'")
    if m.router == "sparsemixer" and m.top_k != 2:
        raise LayoutError(f"model.top_k={m.top_k}: model.router=sparsemixer is top-2; set 2")
    if not 1 <= m.top_k <= m.n_experts:
        raise LayoutError(f"model.top_k={m.top_k} must be in [1, model.n_experts={m.n_experts}]")
    if dims.ep > 1 and m.n_experts % dims.ep:
        raise LayoutError(
            f"model.n_experts={m.n_experts} is not divisible by parallel.ep={dims.ep}: choose "
            "parallel.ep dividing the expert count"
        )
    if dims.tp > 1:
        hidden = m.moe_ffn_hidden or _default_expert_hidden(m)
        if hidden % dims.tp:
            raise LayoutError(
                f"model.moe_ffn_hidden={hidden} (expert hidden size) is not divisible by "
                f"parallel.tp={dims.tp}: tensor parallelism splits every expert's hidden dim; "
                "set model.moe_ffn_hidden to a multiple of tp"
            )
        if job.parallel.sequence_parallel_norms:
            raise LayoutError(
                "parallel.sequence_parallel_norms=true is not supported for model.name=gpt_moe "
                "(the MoE block routes whole sequences): set it to false"
            )


def _default_expert_hidden(m: object) -> int:
    from models.moe import MoEConfig

    fields = MoEConfig.__dataclass_fields__
    return MoEConfig(**{k: getattr(m, k) for k in fields if hasattr(m, k)}).moe_ffn_hidden


def moe_metrics(model: nn.Module) -> dict:
    """Per-layer expert load (fraction of routed token copies per expert, global batch) and
    mean routing entropy (nats) of the last training micro-batch."""
    from models.moe import MoE

    out: dict = {}
    i = 0
    for m in model.modules():
        if isinstance(m, MoE) and m.last_load is not None:
            out[f"moe_load/{i}"] = [round(v, 4) for v in m.last_load.tolist()]
            out[f"moe_entropy/{i}"] = round(m.last_entropy, 4)
            i += 1
    return out
