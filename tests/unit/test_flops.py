"""The analytic FLOPs (``train/flops.py``) equal ``FlopCounterMode``'s count of one training
step, and MFU / peak memory reach ``metrics.jsonl`` and the progress bar.

``FlopCounterMode`` on CPU misses SDPA's fused kernel and ``torch._grouped_mm``: the counted
steps run SDPA's math backend (it counts the full S x S matmuls, so they are compared with
``attention="full"``) and the experts' per-expert matmul loop (which sees exactly the routed
token copies). Tensor/sequence-parallel counts: ``tests/distributed/test_flops_parallel.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.dlrm import DLRM
from models.dmt import DMT
from models.gpt import GPT, GPTConfig
from models.moe import GPTMoE, GroupedExperts, MoEConfig
from parallelism.parallelize_gpt import apply_activation_checkpointing
from tests.trainer_utils import run_trainer
from train.flops import (
    FlopCount,
    dlrm_step_flops,
    dmt_step_flops,
    gpt_step_flops,
    lookup_peak,
    throughput_metrics,
)
from train.metrics import MetricsLogger, read_metrics
from train.recsys_data import SyntheticClicks

B, S = 2, 32
SHAPE = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


def counted(step) -> int:
    """``FlopCounterMode``'s total of ``step()`` (math SDPA, so attention is seen)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


def lm_step(model: torch.nn.Module, x: torch.Tensor):
    return lambda: F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()


def assert_within(analytic: float, count: int, rel: float = 0.02) -> None:
    assert count > 0
    assert abs(analytic - count) / count <= rel, (analytic, count, analytic / count - 1)


def test_dense_gpt_equals_flop_counter() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(**SHAPE)
    x = torch.randint(0, 256, (B, S))
    count = counted(lm_step(GPT(cfg), x))
    assert_within(gpt_step_flops(cfg, B, S, attention="full").model, count)
    # The logged convention counts causal attention at half: smaller than the executed count.
    causal = gpt_step_flops(cfg, B, S).model
    assert causal < count and abs(causal - count) / count > 0.02


def test_recompute_adds_one_forward_of_the_blocks() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(**SHAPE)
    model, x = GPT(cfg), torch.randint(0, 256, (B, S))
    apply_activation_checkpointing(model)
    count = counted(lm_step(model, x))
    flops = gpt_step_flops(cfg, B, S, recompute=True, attention="full")
    assert_within(flops.hardware, count)
    assert flops.model == gpt_step_flops(cfg, B, S, attention="full").model < flops.hardware


def test_moe_counts_active_experts_only() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(**SHAPE, n_experts=8, top_k=2, moe_ffn_hidden=64, router="softmax")
    model = GPTMoE(cfg)
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.use_grouped_mm = False  # per-expert matmuls of the routed rows: counted
    x = torch.randint(0, 256, (B, S))
    count = counted(lm_step(model, x))
    assert_within(gpt_step_flops(cfg, B, S, attention="full").model, count)
    # All experts would be 4x the expert FLOPs: far outside the tolerance.
    dense_all = MoEConfig(**SHAPE, n_experts=8, top_k=8, moe_ffn_hidden=64, router="softmax")
    assert gpt_step_flops(dense_all, B, S, attention="full").model > 1.5 * count


def _clicks(batch: int):
    data = SyntheticClicks(num_sparse=8, num_groups=4, cardinality=32, num_dense=4, seed=0)
    return data, data.batch("train", 0, batch)


def _bce_step(model: torch.nn.Module, b):
    return lambda: F.binary_cross_entropy_with_logits(model(b.dense, b.sparse), b.labels).backward()


def test_dlrm_equals_flop_counter() -> None:
    torch.manual_seed(0)
    data, b = _clicks(16)
    model = DLRM(data.num_dense, data.num_sparse, 16, 32, (32,), (64, 32))
    count = counted(_bce_step(model, b))
    flops = dlrm_step_flops(16, data.num_dense, data.num_sparse, 16, [32], [64, 32])
    assert_within(flops.model, count)


def test_dmt_equals_flop_counter() -> None:
    torch.manual_seed(0)
    data, b = _clicks(16)
    towers = [data.names[i::2] for i in range(2)]
    model = DMT(data.num_dense, towers, 16, 32, 1, (32,), (64, 32))
    count = counted(_bce_step(model, b))
    assert_within(dmt_step_flops(16, data.num_dense, towers, 16, 1, [32], [64, 32]).model, count)


def test_peak_table_and_mfu() -> None:
    assert lookup_peak("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert lookup_peak("NVIDIA H100 PCIe", "bf16") == 756.0
    assert lookup_peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert lookup_peak("Tesla T4", "bf16") is None
    m = throughput_metrics(FlopCount(8e12, 1e13), 2.0, 4, 2.0)
    assert m == {"tflops_per_rank": 1.0, "mfu": 0.5, "hw_tflops_per_rank": 1.25}
    assert "mfu" not in throughput_metrics(FlopCount(1e12, 1e12), 1.0, 1, None)


def test_progress_text_shows_tflops_mfu_and_memory(tmp_path, capsys) -> None:
    logger = MetricsLogger(tmp_path, True, 10, progress=True)  # tqdm on the captured stderr
    logger.progress(3, 1.5, 1000.0, {"tflops_per_rank": 0.25, "mfu": 0.125, "peak_mem_gib": 1.5})
    logger.close()
    text = capsys.readouterr().err
    assert "TFLOP/s=0.250" in text and "MFU=12.5%" in text and "mem=1.50GiB" in text


def test_mfu_and_peak_memory_in_metrics_jsonl(tiny_data, tmp_path, capsys) -> None:
    torch.set_num_threads(1)
    run_trainer(
        [
            "train.steps=2",
            "train.peak_tflops=1.0",
            "logging.progress=true",
            f"data.path={tiny_data}",
            f"run.dir={tmp_path}",
        ]
    )
    rec = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r][-1]
    assert rec["tflops_per_rank"] > 0 and rec["mfu"] == pytest.approx(rec["tflops_per_rank"])
    assert rec["peak_mem_gib"] > 0
    assert "hw_tflops_per_rank" not in rec
    err = capsys.readouterr().err  # the progress bar
    assert "TFLOP/s=" in err and "MFU=" in err and "mem=" in err


def test_no_peak_on_cpu_means_no_mfu(tiny_data, tmp_path) -> None:
    torch.set_num_threads(1)
    overrides = ["train.steps=1", "train.activation_checkpoint=true"]
    run_trainer([*overrides, f"data.path={tiny_data}", f"run.dir={tmp_path}"])
    rec = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r][-1]
    assert "mfu" not in rec and rec["peak_mem_gib"] > 0
    assert rec["hw_tflops_per_rank"] > rec["tflops_per_rank"] > 0


def test_moe_recompute_reruns_the_whole_block() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(**SHAPE, n_experts=4, top_k=2, moe_ffn_hidden=64, router="softmax")
    model = GPTMoE(cfg)
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.use_grouped_mm = False
    apply_activation_checkpointing(model)
    count = counted(lm_step(model, torch.randint(0, 256, (B, S))))
    assert_within(gpt_step_flops(cfg, B, S, recompute=True, attention="full").hardware, count)
