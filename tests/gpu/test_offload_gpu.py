"""Offload on a CUDA model: for every placement (resident on the GPU, staged through it,
updated on the CPU, on NVMe, all four mixed, and the performance model's own choice under
tight budgets), 20 steps equal ``torch.optim.AdamW(fused=True)`` on the GPU, weights and
moments. The CPU suite runs the same checks with the CPU as the "device"; only here do the
pinned-memory copies, the side stream and the device<->host ordering take part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallelism.utils import clip_grad_norm_
from tests.unit.test_offload import (
    CLIP,
    LR,
    STEPS,
    adamw_groups,
    assert_rel_close,
    auto_mix_kwargs,
    batch,
    loss_fn,
    make_opt,
    tiny_gpt,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cuda_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    return x.cuda(), y.cuda()


@pytest.mark.parametrize(
    "placement", ["device", "stage", "cpu", "nvme", "device,stage,cpu,nvme", "auto"]
)
def test_cuda_model_matches_adamw_over_20_steps(placement: str, tmp_path: Path) -> None:
    ref = tiny_gpt().cuda()
    ref_opt = torch.optim.AdamW(adamw_groups(ref), lr=LR, betas=(0.9, 0.95), fused=True)
    for s in range(STEPS):
        ref_opt.zero_grad()
        loss_fn(ref, *_cuda_batch(s)).backward()
        clip_grad_norm_(ref.parameters(), CLIP)
        ref_opt.step()

    model = tiny_gpt().cuda()
    kw = auto_mix_kwargs("cuda", tmp_path) if placement == "auto" else {}
    opt = make_opt(model, placement, tmp_path, **kw)
    if placement == "auto":
        summary = opt.placement_summary()
        assert summary.get("device") and summary.get("nvme"), summary
    for s in range(STEPS):
        opt.zero_grad()
        loss_fn(model, *_cuda_batch(s)).backward()
        opt.step()
    torch.cuda.synchronize()

    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert a.is_cuda, name
        assert_rel_close(a.detach().cpu(), b.detach().cpu())
    mine, theirs = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    for k in theirs:
        for key in ("exp_avg", "exp_avg_sq"):
            assert_rel_close(mine[k][key].cpu(), theirs[k][key].cpu(), 1e-5)
    opt.close()
