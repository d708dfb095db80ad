"""dp_shard=2 (FSDP2 over 2 gloo ranks): each rank offloads its own shard; after 20 steps the
gathered weights equal single-process torch.optim.AdamW on the same global batches."""

from __future__ import annotations

import functools
import tempfile

import pytest

from tests.distributed.harness import run_on_ranks
from tests.unit.test_offload import CLIP, LR, STEPS, adamw_groups, batch, loss_fn, tiny_gpt


def _fsdp_offload(rank: int, world: int, nvme: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from offload.build import interleaved_optimizer
    from parallelism.utils import clip_grad_norm_

    model = tiny_gpt()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = interleaved_optimizer(
        adamw_groups(model),
        lr=LR,
        betas=(0.9, 0.95),
        placement="device,cpu,nvme",
        subgroup_size=1500,
        nvme_path=nvme,
        max_grad_norm=CLIP,
        grad_norm=functools.partial(clip_grad_norm_, max_norm=0.0),
    )
    for s in range(STEPS):
        x, y = batch(s)
        half = x.shape[0] // world
        opt.zero_grad()
        loss_fn(
            model, x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        ).backward()
        opt.step()
    sd = opt.state_dict()["state"]
    moments = {k: v["exp_avg"].full_tensor() for k, v in sd.items()}
    return {
        "params": {n: p.full_tensor() for n, p in model.named_parameters()},
        "exp_avg": moments,
        "summary": opt.placement_summary(),
    }


@pytest.mark.distributed
def test_fsdp2_dp_shard2_offload_matches_adamw() -> None:
    from tests.unit.test_offload import assert_rel_close, train_reference

    ref = tiny_gpt()
    ref_opt = train_reference(ref)
    with tempfile.TemporaryDirectory() as nvme:
        out = run_on_ranks(_fsdp_offload, 2, nvme, timeout_s=60)
    for r in out:
        assert r["summary"].get("nvme") and r["summary"].get("device"), r["summary"]
        for name, b in ref.named_parameters():
            assert_rel_close(r["params"][name], b.detach())
        ref_state = ref_opt.state_dict()["state"]
        for k, s in ref_state.items():
            assert_rel_close(r["exp_avg"][k], s["exp_avg"], 1e-5)
