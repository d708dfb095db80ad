"""The ``gpt_moe`` family: the GPT with GRIN mixture-of-experts feed-forward blocks.

Extends ``gpt`` with the MoE args, the layout checks of expert parallelism, the balancing term
of the loss, per-layer expert-load metrics and the checkpoint's stacked-expert metadata. The
model parallelizes through the same ``parallelize_gpt`` as the dense one (its MoE steps apply
because the model has MoE layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from checkpoint.adapter import CheckpointAdapter
from models.errors import LayoutError
from models.moe import GPTMoE, GroupedExperts, MoE, MoEConfig
from parallelism.init import canonical_name
from train.config import ModelArgs
from train.families.gpt import GPTArgs, GPTFamily, lm_loss


@dataclass
class MoEArgs(GPTArgs):
    """``model=gpt_moe``: the GPT's fields plus the experts'."""

    name: str = "gpt_moe"
    n_experts: int = 8
    """Experts per MoE layer."""
    top_k: int = 2
    """Experts per token (``sparsemixer`` needs 2)."""
    router: str = "sparsemixer"
    """``sparsemixer`` (GRIN SparseMixer-v2) or ``softmax`` (plain top-k)."""
    jitter_eps: float = 0.01
    """SparseMixer-v2 jitter epsilon (experts further than 2*eps are masked)."""
    aux_loss_coef: float = 0.01
    """Weight of the global load-balancing loss (0 disables it)."""
    moe_ffn_hidden: int = 0
    """Hidden size of one expert; 0 means ffn_hidden // top_k (the dense model's active FFN
    parameters)."""
    input_jitter: float = 0.0
    """Training only: multiply each MoE input element by U(1 - j, 1 + j), keyed by token like
    the router noise (HF PhiMoE ``input_jitter_noise``, Mixtral ``router_jitter_noise``)."""
    heun_third: float = 1.0 / 3.0
    """SparseMixer-v2 forward factor of a non-argmax pick on the coin's 0.75 side (0.3333 in
    GRIN's released code and transformers; set by ``model.from_hf``)."""
    balance_convention: str = "lattice"
    """``lattice`` (sum of per-layer Switch losses, f = share of routed copies) or ``hf``
    (transformers' ``load_balancing_loss_func``: pooled over layers, top_k x lattice for one
    layer; needs parallel.pp=1). See docs/moe.md."""


class GPTMoEFamily(GPTFamily):
    """GPT with MoE blocks; expert parallelism borrows data/sequence-parallel ranks."""

    name: ClassVar[str] = "gpt_moe"
    args: ClassVar[type[ModelArgs]] = MoEArgs
    refuses: ClassVar[dict[str, str]] = {}
    config_cls: ClassVar[type] = MoEConfig
    model_cls: ClassVar[type[nn.Module]] = GPTMoE

    def validate(self) -> None:
        """The dense checks plus the MoE fields against the layout (sizes from ``MoEConfig``)."""
        super().validate()
        cfg, dims = self.model_config(), self.dims
        if dims.ep > 1 and cfg.n_experts % dims.ep:
            raise LayoutError(
                f"model.n_experts={cfg.n_experts} is not divisible by parallel.ep={dims.ep}: "
                "choose parallel.ep dividing the expert count"
            )
        if dims.tp > 1 and cfg.moe_ffn_hidden % dims.tp:
            raise LayoutError(
                f"model.moe_ffn_hidden={cfg.moe_ffn_hidden} (expert hidden size) is not divisible "
                f"by parallel.tp={dims.tp}: tensor parallelism splits every expert's hidden dim; "
                "set model.moe_ffn_hidden to a multiple of tp"
            )
        if cfg.balance_convention == "hf" and dims.pp > 1:
            raise LayoutError(
                f"model.balance_convention=hf with parallel.pp={dims.pp}: transformers' loss "
                "pools every layer's statistics before the product, which pipeline stages "
                "cannot; use model.balance_convention=lattice or parallel.pp=1"
            )
        if dims.tp > 1 and self.job.parallel.sequence_parallel_norms:
            raise LayoutError(
                "parallel.sequence_parallel_norms=true is not supported for model.name=gpt_moe "
                "(the MoE block routes whole sequences): set it to false"
            )

    def build_model(self, device: torch.device, saved: object = None) -> nn.Module:
        """As the dense family's; the router noise is also keyed by ``train.seed``."""
        model = super().build_model(device, saved)
        for m in model.modules():
            if isinstance(m, MoE):
                m.noise_salt = (self.job.train.seed << 32) | m.noise_salt
        return model

    def loss(self, out: torch.Tensor, y: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Next-token cross-entropy plus ``aux_loss_coef`` x the global balancing loss (summed
        over MoE layers; carried on the logits as ``moe_aux_loss`` by a training forward)."""
        loss = lm_loss(out, y, vocab_size)
        aux = getattr(out, "moe_aux_loss", None)
        coef = self.job.model.aux_loss_coef
        if aux is not None and coef:
            loss = loss + coef * aux
        return loss

    def checkpoint_adapter(self, model: nn.Module) -> CheckpointAdapter:
        base = super().checkpoint_adapter(model)
        experts = frozenset(
            canonical_name(f"{mod_name}.{p_name}")
            for mod_name, mod in model.named_modules()
            if isinstance(mod, GroupedExperts)
            for p_name, _ in mod.named_parameters(recurse=False)
        )
        return CheckpointAdapter(base.logical_name, base.padding, experts=experts)

    def metrics(self, model: nn.Module) -> dict:
        """Per-layer expert load (fraction of routed token copies per expert, global batch) and
        mean routing entropy (nats) of the last training micro-batch."""
        out: dict = {}
        i = 0
        for m in model.modules():
            if isinstance(m, MoE) and m.last_load is not None:
                out[f"moe_load/{i}"] = [round(v, 4) for v in m.last_load.tolist()]
                out[f"moe_entropy/{i}"] = round(m.last_entropy, 4)
                i += 1
        return out
