"""Materialise a meta-device model and initialise it identically whatever the layout.

Every parameter's initial value is drawn from a generator seeded by (seed, canonical name), on
the CPU, at its full logical shape, and each rank keeps only its shard. A tensor-parallel,
FSDP-sharded or pipelined model therefore starts from exactly the weights of the single-process
model (DTensor's own random ops only guarantee that on CUDA, and only for one mesh). The price is
one full tensor at a time on the host during start-up, as Megatron's CPU initialisation pays.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.", "module.")


def canonical_name(fqn: str) -> str:
    """The parameter's name in the plain model (wrapper prefixes removed)."""
    for p in WRAPPER_PREFIXES:
        fqn = fqn.replace(p, "")
    return fqn


def param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose stream depends only on ``seed`` and the canonical ``name``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


@torch.no_grad()
def copy_full_into_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (logical) tensor into ``param``, keeping only this rank's shard for DTensors."""
    if isinstance(param, DTensor):
        shard = distribute_tensor(
            full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full.to(param.dtype))


@torch.no_grad()
def materialize_and_init_(
    model: nn.Module, seed: int, device: torch.device | str = "cpu", init: bool = True
) -> None:
    """Allocate a (meta) model on ``device`` and fill every parameter from its seeded generator.

    The model (or the module that owns the parameters under wrappers) must define
    ``init_tensor(name, shape, generator)``. ``init=False`` only allocates (and re-ties): for a
    caller that fills every parameter itself (``model.from_hf``), which then never holds a full
    random tensor.
    """
    root = getattr(model, "init_tensor", None)
    if root is None:
        raise TypeError(f"{type(model).__name__} has no init_tensor(name, shape, generator)")
    shared = _shared_parameters(model)
    model.to_empty(device=device)
    _retie_(shared)
    if not init:
        return
    for fqn, p in model.named_parameters():
        name = canonical_name(fqn)
        full = root(name, tuple(p.shape), param_generator(seed, name))
        copy_full_into_(p, full)


def _shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (module, attribute) that hold one Parameter (tied embeddings)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mod, name))
    return [group for group in owners.values() if len(group) > 1]


def _retie_(shared: list[list[tuple[nn.Module, str]]]) -> None:
    """Restore ties that ``Module.to_empty`` broke (it gives every module a new tensor of its
    own, so ``output.weight`` would stop being ``tok_embeddings.weight``)."""
    for (mod0, name0), *rest in shared:
        first = getattr(mod0, name0)
        for mod, name in rest:
            setattr(mod, name, first)


def local_index(param: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per dimension, the global indices of this rank's local tensor of ``param`` (1-D int64):
    its shard under any DTensor placements (``Shard``, FSDP's ``_StridedShard`` over tensor
    parallelism, ``Replicate``), or every index for a plain tensor.

    Computed with DTensor's own split of an index grid (an expanded view, so no full-size
    tensor is made; the split's copy is at most one int32 shard), so the indices are exactly
    the ones ``distribute_tensor`` would keep.
    """
    shape = tuple(param.shape)
    if not isinstance(param, DTensor):
        return tuple(torch.arange(n) for n in shape)
    out = []
    for d, n in enumerate(shape):
        view = [1] * len(shape)
        view[d] = n
        grid = torch.arange(n, dtype=torch.int32).view(view).expand(shape)
        local = distribute_tensor(
            grid, param.device_mesh, param.placements, src_data_rank=None
        ).to_local()
        if local.numel() == 0:
            out.append(torch.zeros(local.shape[d], dtype=torch.long))
            continue
        out.append(local.movedim(d, 0).reshape(local.shape[d], -1)[:, 0].long())
    return tuple(out)


@torch.no_grad()
def copy_local_into_(param: torch.Tensor, local: torch.Tensor) -> None:
    """Copy this rank's part (the values at ``local_index(param)``) into ``param``."""
    target = param.to_local() if isinstance(param, DTensor) else param
    if tuple(local.shape) != tuple(target.shape):
        raise ValueError(f"local part {tuple(local.shape)} != shard {tuple(target.shape)}")
    target.copy_(local.to(target.dtype))
