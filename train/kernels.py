"""Kernel choice: NVIDIA apex's fused Adam and fused RMSNorm where apex imports, torch otherwise.

``optim.impl=apex_fused_adam`` builds ``apex.optimizers.FusedAdam`` (``adam_w_mode=True``,
i.e. AdamW) and ``auto`` stays on torch's fused AdamW. When apex imports, ``apply_fused_rmsnorm``
makes every ``models.gpt.RMSNorm`` call ``apex.normalization``'s fused RMSNorm on its own
``weight`` (the parameter and its name are unchanged, so checkpoints and sharding plans do
not see the swap); without apex the model keeps ``torch.nn.functional.rms_norm``. The swap lives
here, not in ``models/``, so models stay plain. ``describe_kernels`` is the start-up log line.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from train.optional import apex_available


def build_apex_fused_adam(groups: list[dict], kw: dict) -> torch.optim.Optimizer:
    """apex FusedAdam in AdamW mode over ``groups`` (``kw``: lr, betas, eps)."""
    from apex.optimizers import FusedAdam

    return FusedAdam(groups, adam_w_mode=True, **kw)


def _apex_rms_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    return fused_rms_norm_affine(x, self.weight, (x.shape[-1],), self.eps)


def apply_fused_rmsnorm(model: nn.Module) -> int | None:
    """Route every ``models.gpt.RMSNorm`` in ``model`` through apex's fused kernel.

    Returns:
        The number of norms swapped (0 when apex is absent: the model is left as it is), or
        None for a model without RMSNorm (the recommenders).
    """
    from models.gpt import RMSNorm

    if not any(isinstance(m, RMSNorm) for m in model.modules()):
        return None
    if not apex_available():
        return 0

    n = 0
    for mod in model.modules():
        if isinstance(mod, RMSNorm):
            mod.forward = types.MethodType(_apex_rms_forward, mod)
            n += 1
    return n


def describe_kernels(job: Any, fused_norms: int | None) -> str:
    """One start-up line: which optimizer kernel and which RMSNorm the run uses, and why.

    Args:
        fused_norms: RMSNorms routed through apex (``apply_fused_rmsnorm``); ``None`` for a
            model without RMSNorm (the recommenders).
    """
    apex = apex_available()
    impl = job.optim.impl
    opt = "apex FusedAdam (AdamW mode)" if impl == "apex_fused_adam" else f"torch AdamW ({impl})"
    if fused_norms is None:
        norm = "none (no RMSNorm in this model)"
    elif fused_norms:
        norm = f"apex fused RMSNorm ({fused_norms} norms)"
    else:
        norm = "torch.nn.functional.rms_norm"
    note = "NVIDIA apex found" if apex else "NVIDIA apex not installed"
    return f"kernels: optimizer {opt}, norm {norm} ({note}) | data.backend={job.data.backend}"
