"""Vocab-parallel cross-entropy equals the full cross-entropy and never holds full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.harness import run_on_ranks

B, S, V, E = 4, 16, 257, 16  # V does not divide tp=2: the padded column must not leak


class _SavedShapes(torch.autograd.graph.saved_tensors_hooks):
    """Records the *local* shape of every tensor autograd keeps for backward (DTensors are
    unwrapped to this rank's shard): what a rank actually materialises and holds."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            from torch.distributed.tensor import DTensor

            local = t.to_local() if isinstance(t, DTensor) else t
            self.shapes.append(tuple(local.shape))
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self) -> _SavedShapes:
        super().__enter__()
        return self


def _ce_fn(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from models.gpt import GPT, GPTConfig
    from parallelism.init import materialize_and_init_
    from parallelism.tensor_parallel import (
        apply_tensor_parallel,
        padded_vocab,
        tp_loss_context,
        vocab_parallel_cross_entropy,
    )

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    vp = padded_vocab(V, world)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(B, S, V, generator=gen)
    y = torch.randint(0, V, (B, S), generator=gen)
    # (a) value and gradient of the loss on vocab-sharded logits (padded to vp columns)
    padded = torch.cat([full, torch.randn(B, S, vp - V, generator=gen) * 50], dim=-1)
    cols = vp // world
    local = padded[..., rank * cols : (rank + 1) * cols].clone().requires_grad_(True)
    with tp_loss_context(world):
        dt = DTensor.from_local(local, mesh, [Shard(-1)], run_check=False)
        loss = vocab_parallel_cross_entropy(dt, y, V)
        loss.backward()
    # (b) the model path: largest logits tensor any op sees during forward + backward
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=V, dim=E, n_layers=1, n_heads=2, ffn_hidden=32))
    apply_tensor_parallel(model, mesh)
    materialize_and_init_(model, 0)
    tokens = torch.randint(0, V, (B, S), generator=gen)
    with tp_loss_context(world), _SavedShapes() as saved:
        out = model(tokens)
        mloss = vocab_parallel_cross_entropy(out, y, V)
    with tp_loss_context(world):
        mloss.backward()
    # negative control: the same detector on the unsharded model sees B x S x V logits
    with torch.device("meta"):
        plain = GPT(GPTConfig(vocab_size=V, dim=E, n_layers=1, n_heads=2, ffn_hidden=32))
    materialize_and_init_(plain, 0)
    with _SavedShapes() as saved_plain:
        F.cross_entropy(plain(tokens).flatten(0, 1), y.flatten())
    return {
        "loss": loss.item(),
        "grad": local.grad.numpy(),  # numpy: tensors do not survive the child exiting
        "logits_local": tuple(out.to_local().shape),
        "max_numel": max(torch.Size(s).numel() for s in saved.shapes if s),
        "vocab_shapes": sorted({s for s in saved.shapes if s and s[-1] in (vp, vp // world)}),
        "plain_max_numel": max(torch.Size(s).numel() for s in saved_plain.shapes if s),
        "model_loss": mloss.item(),
        "ref_model_loss": F.cross_entropy(
            out.full_tensor()[..., :V].flatten(0, 1), y.flatten()
        ).item(),
    }


@pytest.mark.distributed
def test_vocab_parallel_ce_equals_full_ce_without_full_logits() -> None:
    world = 2
    res = run_on_ranks(_ce_fn, world, timeout_s=60)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(B, S, V, generator=gen).requires_grad_(True)
    y = torch.randint(0, V, (B, S), generator=gen)
    ref = F.cross_entropy(full.flatten(0, 1), y.flatten())
    ref.backward()
    vp = 258
    grad = torch.cat([torch.from_numpy(r["grad"]) for r in res], dim=-1)
    for r in res:
        assert abs(r["loss"] - ref.item()) <= 1e-6 * ref.item()
        assert abs(r["model_loss"] - r["ref_model_loss"]) <= 1e-5 * r["ref_model_loss"]
        # no rank ever holds B x S x V logits (nor anything that large)
        assert r["logits_local"] == (B, S, vp // world)
        assert r["max_numel"] < B * S * V, r["max_numel"]
        assert max(s[-1] for s in r["vocab_shapes"] if len(s) >= 2 and s[0] >= B) == vp // world
        assert r["plain_max_numel"] >= B * S * V  # the detector does see full logits
    torch.testing.assert_close(grad[..., :V], full.grad, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(grad[..., V:]) == 0  # padded column: zero gradient
