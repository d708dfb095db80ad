"""Throughput in FLOPs: analytic FLOPs per step, accelerator peaks, MFU and peak memory.

What is hand-written here, and why:

- **The FLOP formulas** (``gpt_step_flops``, ``dlrm_step_flops``, ``dmt_step_flops``). Torch's
  ``torch.utils.flop_counter.FlopCounterMode`` counts what a step executes, but it intercepts
  every op of the step (too slow to run every step) and, on CPU, does not see SDPA's fused
  kernel or ``torch._grouped_mm`` at all. So each family computes its count from the model
  config and the train shapes once; ``tests/unit/test_flops.py`` checks each formula against
  ``FlopCounterMode``'s count of a real training step (math SDPA, per-expert matmuls).
- **The peak table** (``PEAKS``): torch exposes no accelerator's peak throughput.

Conventions (docs/performance.md has the formulas):

- Matmul FLOPs only (2 per multiply-add); norms, activations, softmax, the loss and the
  optimizer are not counted (neither does ``FlopCounterMode``). Embedding lookups are not FLOPs.
- Training = forward + backward = 3 x forward (backward computes the input and the weight
  gradient), except a layer whose input needs no gradient (DLRM's first dense layer): 2 x.
- **Attention is counted causal, at half the S x S cost** (what a causal kernel needs, as the
  peers report it). ``FlopCounterMode`` counts SDPA's full S x S matmuls as executed
  (``is_causal`` does not halve them): ``attention="full"`` gives that count, for the test.
- **Model FLOPs** do not change with activation recompute; **hardware FLOPs** add the extra
  forward of every recomputed block (``train.activation_checkpoint``), as torch executes it
  (``gpt_step_flops`` says what its checkpoint skips).
- Per rank: the global step's FLOPs divided by the world size (every rank of every layout does
  an equal share of the math: data, tensor, sequence, pipeline and expert parallelism split it).
"""

from __future__ import annotations

import itertools
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one global optimizer step (all ranks together), forward + backward."""

    model: float
    """What the model needs: unchanged by activation recompute."""
    hardware: float
    """What the ranks execute: ``model`` plus the recomputed forwards."""


# -- the formulas -----------------------------------------------------------------------------
def _attention_core(cfg: Any, seq_len: int, attention: str) -> float:
    """Forward FLOPs of QK^T and PV for one token in one layer: 4 x S x H x Dh (full), half of
    it causal. GQA's key/value heads are repeated to the query heads, so H counts."""
    if attention not in ("causal", "full"):
        raise ValueError(f"attention={attention!r}: use 'causal' or 'full'")
    full = 4.0 * seq_len * cfg.n_heads * cfg.head_dim
    return full / 2 if attention == "causal" else full


def gpt_block_params(cfg: Any) -> int:
    """Matmul parameters one token passes through in one block: q, k, v, o projections and the
    feed-forward (for MoE: ``top_k`` experts plus the router)."""
    qo = 2 * cfg.dim * cfg.n_heads * cfg.head_dim
    kv = 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
    if hasattr(cfg, "n_experts"):  # MoEConfig: only the routed (active) experts
        ffn = cfg.top_k * 3 * cfg.dim * cfg.moe_ffn_hidden + cfg.dim * cfg.n_experts
    else:
        ffn = 3 * cfg.dim * cfg.ffn_hidden
    return qo + kv + ffn


def gpt_step_flops(
    cfg: Any, batch: int, seq_len: int, recompute: bool = False, attention: str = "causal"
) -> FlopCount:
    """FLOPs of one step of a ``GPT`` / ``GPTMoE`` over ``batch`` sequences of ``seq_len``.

    Per token, forward: 2 x (block matmul params x L + dim x vocab) + attention core x L;
    training is 3 x that. Recompute adds one forward of the blocks (not of the output layer),
    less what torch's non-reentrant checkpoint skips: it stops re-running a block once the last
    tensor the backward needs is saved again, which in a dense block is ``w2``'s input, so
    ``w2``'s forward is not repeated (an MoE block's expert output is saved by the routing-weight
    product, so its whole forward re-runs). Measured with ``FlopCounterMode`` in the tests.

    Args:
        cfg: a ``GPTConfig`` or ``MoEConfig`` (``vocab_size``: the logical vocabulary; the
            rows tensor parallelism pads on are not counted).
        batch: sequences in the global batch.
        seq_len: tokens per sequence.
        recompute: ``train.activation_checkpoint`` (every block recomputed in backward).
        attention: ``"causal"`` (logged) or ``"full"`` (what ``FlopCounterMode`` counts).
    """
    tokens = batch * seq_len
    block_fwd = 2.0 * gpt_block_params(cfg) + _attention_core(cfg, seq_len, attention)
    fwd = cfg.n_layers * block_fwd + 2.0 * cfg.dim * cfg.vocab_size
    model = 3.0 * fwd * tokens
    skipped = 0.0 if hasattr(cfg, "n_experts") else 2.0 * cfg.dim * cfg.ffn_hidden
    extra = cfg.n_layers * (block_fwd - skipped) * tokens if recompute else 0.0
    return FlopCount(model, model + extra)


def mlp_flops(sizes: list[int], input_grad: bool = True) -> float:
    """Training FLOPs per sample of a chain of linears ``sizes[0] -> sizes[1] -> ...``; the
    first layer skips its input gradient when ``input_grad`` is False."""
    total = 0.0
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        total += 2.0 * a * b * (2 if i == 0 and not input_grad else 3)
    return total


def _dots(n: int, dim: int) -> float:
    """Training FLOPs per sample of ``pairwise_dots`` on [n, dim]: the full n x n bmm
    (the upper triangle is taken afterwards), forward + both input gradients."""
    return 3 * 2.0 * n * n * dim


def dlrm_step_flops(
    batch: int,
    num_dense: int,
    num_sparse: int,
    dim: int,
    dense_layers: list[int],
    over_layers: list[int],
) -> FlopCount:
    """One step of ``models.dlrm.DLRM``: dense MLP (dense inputs need no gradient), the dot
    interaction of [dense, F pooled embeddings], the over MLP. Lookups are not FLOPs."""
    n_inter = dim + (num_sparse + 1) * num_sparse // 2
    per = mlp_flops([num_dense, *dense_layers, dim], input_grad=False)
    per += _dots(num_sparse + 1, dim) + mlp_flops([n_inter, *over_layers, 1])
    return FlopCount(batch * per, batch * per)


def dmt_step_flops(
    batch: int,
    num_dense: int,
    towers: list[list[str]],
    dim: int,
    tower_out: int,
    dense_layers: list[int],
    over_layers: list[int],
) -> FlopCount:
    """One step of ``models.dmt.DMT``: DLRM's parts plus each tower module (its dots and its
    projection); the global interaction runs over the dense embedding and the towers' outputs."""
    per = mlp_flops([num_dense, *dense_layers, dim], input_grad=False)
    k = 0
    for names in towers:
        n = len(names)
        if tower_out > 0:
            per += _dots(n, dim) + mlp_flops([n * dim + n * (n - 1) // 2, tower_out * dim])
        k += tower_out if tower_out > 0 else n
    n_inter = dim + k * dim + (k + 1) * k // 2
    per += _dots(k + 1, dim) + mlp_flops([n_inter, *over_layers, 1])
    return FlopCount(batch * per, batch * per)


# -- peaks ------------------------------------------------------------------------------------
# Dense (not 2:4 sparse) peak TFLOP/s per GPU, from NVIDIA's public datasheets: H100 and H200
# "Tensor Core GPU" datasheets (SXM / PCIe or NVL columns), the A100 datasheet, and the HGX B200
# spec table (8-GPU figures / 8). The datasheets print bf16 with sparsity; the dense figure is
# half of it. "fp32" is the non-tensor-core FP32 rate (torch's default fp32 matmul; with TF32
# enabled the achieved rate can exceed it).
PEAKS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250.0, "fp32": 75.0},
    "H200 NVL": {"bf16": 835.0, "fp32": 60.0},
    "H200": {"bf16": 989.0, "fp32": 67.0},  # SXM
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": {"bf16": 312.0, "fp32": 19.5},
}


def lookup_peak(device_name: str, dtype: str) -> float | None:
    """The table's peak for a ``torch.cuda.get_device_name()`` string; the most specific
    matching key wins (``H100 PCIe`` before ``H100``). None when the device is not listed."""
    for key in sorted(PEAKS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAKS[key][dtype]
    return None


def resolve_peak(peak_tflops: float, dtype: str, device: torch.device) -> float | None:
    """``train.peak_tflops`` when set (> 0), else the table's entry for this GPU; None on CPU
    (no meaningful peak: MFU is left out of the records)."""
    if peak_tflops > 0:
        return peak_tflops
    if device.type == "cuda":
        return lookup_peak(torch.cuda.get_device_name(device), dtype)
    return None


# -- per-step metrics -------------------------------------------------------------------------
def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory in GiB: ``torch.cuda.max_memory_allocated`` on CUDA, else
    the process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def throughput_metrics(
    count: FlopCount | None, step_time_s: float, world_size: int, peak_tflops: float | None
) -> dict[str, float]:
    """``tflops_per_rank`` (model FLOPs, causal attention at half cost), ``mfu`` (fraction of
    ``peak_tflops``, only when a peak is known) and ``hw_tflops_per_rank`` (only when
    recompute makes the hardware count differ)."""
    if count is None:
        return {}
    tflops = count.model / world_size / step_time_s / 1e12
    out = {"tflops_per_rank": tflops}
    if peak_tflops:
        out["mfu"] = tflops / peak_tflops
    if count.hardware != count.model:
        out["hw_tflops_per_rank"] = count.hardware / world_size / step_time_s / 1e12
    return out
