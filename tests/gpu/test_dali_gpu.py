"""``data.dali_device=gpu``: the DALI token pipeline with ``device_id=LOCAL_RANK`` and its
outputs moved to the GPU inside the pipeline yields exactly the CPU pipeline's batches (and the
torch loader's), as CUDA tensors, across an epoch boundary and a mid-run rewind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.data import TokenLoader, TokenShards, write_shards
from train.loaders import DaliTokenLoader
from train.optional import dali_available

S, G, MICRO = 16, 8, 4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI (the dali extra)"),
]


def test_dali_gpu_tokens_equal_cpu_pipeline(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    rng = np.random.default_rng(0)
    write_shards(tmp_path, rng.integers(0, 256, 61 * S + 1), rng.integers(0, 256, 200), 256, "t")
    shards = TokenShards.open(tmp_path, "train")
    args = (shards, S, G, MICRO, 0, 1, 5, True)
    ref = TokenLoader(*args)
    cpu = DaliTokenLoader(*args, threads=2, device="cpu")
    gpu = DaliTokenLoader(*args, threads=2, device="gpu")
    assert gpu.device_id == 0
    for step in range(10):  # 61 samples, 8 per step: crosses an epoch boundary
        if step == 6:  # a rewind rebuilds both pipelines at the new position
            for ld in (ref, cpu, gpu):
                ld.load_state_dict({"consumed_samples": 2 * G})
        want, c, g = ref.next_batch(), cpu.next_batch(), gpu.next_batch()
        assert len(want) == len(c) == len(g) == G // MICRO
        for (x, y), (xc, yc), (xg, yg) in zip(want, c, g):
            assert xg.device.type == "cuda" and yg.device.type == "cuda"
            assert xg.dtype == yg.dtype == torch.int64
            assert xc.device.type == "cpu"
            assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
            assert torch.equal(xc, x) and torch.equal(yc, y)
    cpu.close()
    gpu.close()
