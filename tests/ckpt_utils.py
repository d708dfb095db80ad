"""Tiny objects for checkpoint tests: a model, its optimizer after a step, state snapshots."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from train.config import CheckpointArgs


def tiny_model(seed: int = 0, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 8))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int, mgr=None) -> None:
    g = torch.Generator().manual_seed(seed)
    width = next(model.parameters()).shape[-1]
    x = torch.randn(16, width, generator=g)
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    if mgr is not None:
        mgr.wait_before_update()
    opt.step()


def make(seed: int = 0, width: int = 64) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = tiny_model(seed, width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def args(root, mode: str = "sync", **kw) -> CheckpointArgs:
    return CheckpointArgs(enabled=True, mode=mode, dir=str(root), **kw)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Full (unsharded) clones of model + optimizer state under the checkpoint's names."""
    out = {}
    for k, v in get_model_state_dict(model).items():
        out[f"model/{k}"] = _full(v)
    for k, st in get_optimizer_state_dict(model, opt)["state"].items():
        for kk, v in st.items():
            out[f"optim/{k}/{kk}"] = _full(v)
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
