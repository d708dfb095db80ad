"""The planner's cost model: per-rank memory, communication bytes and step time of a layout.

Hand-written, because no library predicts Lattice's own memory and traffic: the formulas follow
what Lattice's trainer builds (``parallelism/``, ``models/gpt.py``, ``models/moe.py``) and are
checked against one real step on CPU ranks (``benchmarks/planner_memory.py``,
``tests/distributed/test_planner_memory.py``). The time model is the usual roofline sum
(Narayanan et al. 2021; Korthikanti et al. 2022 for activations): compute at an efficiency of
the GPU's peak, the pipeline bubble, the collectives a step waits for, the optimizer. Every
constant is in ``GPUS`` / ``EFFICIENCY`` below, overridable from ``python -m train.plan``, and
docs/performance.md says how each was chosen and how to measure it (``--measure``).

Memory (bytes on the most loaded rank):

- parameters, gradients: fp32, per tensor after the tensor-parallel split, pipeline stage,
  expert-parallel split and FSDP2's dim-0 shard (rounded up, as FSDP2 pads);
- optimizer state: AdamW's two fp32 moments; with ``offload`` the fp32 master copy and both
  moments live on the host (reported apart, ``host``);
- activations: what autograd saves per token per block (counted on Lattice's blocks: each
  RMSNorm keeps its input, the normalised and the scaled output in fp32, plus a bf16 copy under
  autocast; q, repeated k, v, the attention output and its reshaped copy; SwiGLU's four
  hidden-size tensors; an MoE block's routed copies instead), times the micro-batches a pipeline
  stage holds; the loss keeps the vocabulary-wide log-probabilities. With
  ``train.activation_checkpoint`` a block keeps only its fp32 input plus one block recomputed;
- buffers: FSDP2's all-gathered block (current + prefetched) and reduce-scatter gradients, DDP's
  buckets, and under bf16 autocast the bf16 weight copies the graph saves.

Communication: bytes each rank sends per optimizer step (ring algorithms: all-reduce
2(n-1)/n x N, all-gather / reduce-scatter / all-to-all (n-1)/n x N), by dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from train.flops import PEAKS, gpt_step_flops

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """One accelerator and its links. Bandwidths are achievable NCCL bus bandwidths per GPU,
    GB/s (not the datasheet's bidirectional totals)."""

    name: str
    memory_gib: float
    peak_tflops: dict[str, float]
    nvlink_gbps: float
    """Intra-node (NVLink/NVSwitch) bus bandwidth per GPU."""
    ib_gbps: float
    """Inter-node bandwidth per GPU (one NIC per GPU)."""
    hbm_gbps: float
    """Device memory bandwidth (the optimizer step is memory-bound)."""
    pcie_gbps: float = 25.0
    """Host <-> device copies (optimizer offload)."""


# Datasheet figures (NVIDIA H100/H200/A100/B200 datasheets) reduced to what NCCL achieves:
# NVLink 4 is 450 GB/s per direction, nccl-tests all-reduce bus bandwidth on 8 x H100 reaches
# ~360 GB/s; a 400 Gb/s NIC is 50 GB/s, ~40 GB/s achieved. A100: NVLink 3 300 -> 230, HDR
# 200 Gb/s -> 20. B200: NVLink 5 900 -> 720. ``cpu`` is for tests and small CPU runs.
GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM 80GB", 80, PEAKS["H100"], 360.0, 40.0, 3350.0),
    "h200": GPU("H200 SXM 141GB", 141, PEAKS["H200"], 360.0, 40.0, 4800.0),
    "a100": GPU("A100 SXM 80GB", 80, PEAKS["A100"], 230.0, 20.0, 2039.0),
    "b200": GPU("B200 180GB", 180, PEAKS["B200"], 720.0, 40.0, 8000.0),
    "cpu": GPU("CPU (gloo)", 1024, {"bf16": 1.0, "fp32": 1.0}, 10.0, 1.0, 20.0, 20.0),
}


@dataclass(frozen=True)
class Efficiency:
    """The time model's dimensionless constants (one set for every model and cluster)."""

    compute: float = 0.37
    """Achieved fraction of the bf16 (or fp32) peak over a whole training step's FLOPs in eager
    mode (matmuls at ~70% of peak, plus norms, rotary, softmax and the loss at HBM speed).
    Calibrated once: torchtitan's Llama 3.1 8B FSDP figure (5,762 tokens/s/GPU) predicted at
    0.40 gave 6,179, so 0.40 x 5762 / 6179 = 0.373 (docs/performance.md)."""
    overlap: float = 0.9
    """Fraction of the compute time that FSDP/DDP/HSDP collectives can hide behind (prefetched
    all-gathers, reduce-scatters during backward); tp, sp, ep and pp traffic is not hidden."""
    memory_usable: float = 0.90
    """Fraction of device memory a layout may plan for (CUDA context, allocator fragmentation)."""
    cpu_adam_gbps: float = 10.0
    """Host AdamW throughput in GB of fp32 state touched per second (``offload``)."""


EFFICIENCY = Efficiency()


# -- the model's tensors --------------------------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    """One parameter: its full shape, where it lives and how it splits."""

    shape: tuple[int, ...]
    stage: str
    """``first`` (embedding), ``layer``, ``last`` (final norm, output)."""
    tp_dim: int | None = None
    """Dimension tensor parallelism splits (None: replicated over tp)."""
    expert: bool = False


def model_tensors(cfg: Any, tp: int) -> list[Tensor]:
    """Every parameter of one ``GPT``/``GPTMoE`` block (``stage='layer'``, once) and the
    embedding/output; the vocabulary rows are padded to a multiple of ``tp`` as ``pad_vocab_``."""
    d, hd, kd = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    vocab = max(cfg.padded_vocab_size, -(-cfg.vocab_size // tp) * tp)
    out = [Tensor((vocab, d), "first", 0)]
    layer = [Tensor((d,), "layer"), Tensor((d,), "layer")]
    layer += [Tensor((hd, d), "layer", 0), Tensor((kd, d), "layer", 0), Tensor((kd, d), "layer", 0)]
    layer += [Tensor((d, hd), "layer", 1)]
    if hasattr(cfg, "n_experts"):
        e, h = cfg.n_experts, cfg.moe_ffn_hidden
        layer += [Tensor((e, d), "layer")]  # router, replicated over tp
        layer += [Tensor((e, d, h), "layer", 2, True), Tensor((e, d, h), "layer", 2, True)]
        layer += [Tensor((e, h, d), "layer", 1, True)]
    else:
        f = cfg.ffn_hidden
        layer += [
            Tensor((f, d), "layer", 0),
            Tensor((f, d), "layer", 0),
            Tensor((d, f), "layer", 1),
        ]
    out += [*layer, Tensor((d,), "last")]
    if not cfg.tie_embeddings:
        out.append(Tensor((vocab, d), "last", 0))
    return out


def _local_numel(t: Tensor, lay: Layout) -> tuple[int, int]:
    """(elements on the most loaded rank, elements before the FSDP shard) of one tensor."""
    shape = list(t.shape)
    if t.tp_dim is not None and lay.tp > 1:
        shape[t.tp_dim] //= lay.tp
    if t.expert and lay.ep > 1:
        shape[0] //= lay.ep
        return math.prod(shape), math.prod(shape)  # outside FSDP: replicated over edp
    unsharded = math.prod(shape)
    n = lay.fsdp_size
    if n > 1:
        shape[0] = -(-shape[0] // n)
    return math.prod(shape), unsharded


# -- the layout -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Degrees and the knobs the search varies; everything else comes from the config."""

    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1
    ep: int = 1
    micro_batch: int = 1
    recompute: bool = False
    sp_norms: bool = False
    """``parallel.sequence_parallel_norms``."""
    schedule: str = "1f1b"
    virtual: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp_replicate * self.dp_shard * self.sp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_size(self) -> int:
        """Ranks FSDP2 shards over: ``dp_shard x sp`` (HSDP replicates across dp_replicate)."""
        return self.dp_shard * self.sp

    @property
    def uses_fsdp(self) -> bool:
        model_parallel = self.tp > 1 or self.pp > 1 or self.ep > 1
        return self.fsdp_size > 1 or (self.dp_replicate > 1 and model_parallel)

    def label(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in ("tp", "pp", "dp_shard", "dp_replicate")]
        parts += [f"{n}={getattr(self, n)}" for n in ("sp", "ep") if getattr(self, n) > 1]
        parts.append(f"mbs={self.micro_batch}")
        if self.pp > 1:
            parts.append(self.schedule + (f"(v={self.virtual})" if self.virtual > 1 else ""))
        if self.recompute:
            parts.append("recompute")
        if self.sp_norms:
            parts.append("sp_norms")
        return " ".join(parts)


@dataclass(frozen=True)
class Workload:
    """The config's model and shapes (what the layout must run)."""

    cfg: Any
    global_batch: int
    seq_len: int
    dtype: str = "fp32"
    offload: str = "none"
    pp_microbatches: int = 0

    def n_micro(self, lay: Layout) -> int:
        per_rank = self.global_batch // lay.dp
        if lay.pp > 1 and self.pp_microbatches:
            return self.pp_microbatches
        return max(1, per_rank // lay.micro_batch)

    def micro_rows(self, lay: Layout) -> int:
        """Sequences in one micro-batch on one rank."""
        return self.global_batch // lay.dp // self.n_micro(lay)


# -- memory -----------------------------------------------------------------------------------------
@dataclass
class Memory:
    """Bytes per rank on the most loaded pipeline stage (``device``) and on the host."""

    device: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.device.values())


def _stage_params(w: Workload, lay: Layout, stage: int) -> tuple[float, float, float]:
    """(local sharded, local unsharded non-expert per block, local expert) elements of one
    pipeline rank (``stage`` in 0..pp-1); layers split evenly, embedding first, output last."""
    layers = w.cfg.n_layers // lay.pp
    sharded = unsharded_block = expert = 0.0
    for t in model_tensors(w.cfg, lay.tp):
        local, unsharded = _local_numel(t, lay)
        if t.stage == "layer":
            sharded += local * layers
            if t.expert and lay.ep > 1:
                expert += local * layers
            else:
                unsharded_block += unsharded
        elif (t.stage == "first" and stage == 0) or (t.stage == "last" and stage == lay.pp - 1):
            sharded += local
    return sharded, unsharded_block, expert


def _in_flight(w: Workload, lay: Layout, stage: int) -> float:
    """Micro-batches whose activations one pipeline rank holds at its peak, in units of the
    whole stage (interleaved: chunks of 1/v of the stage)."""
    m = w.n_micro(lay)
    if lay.pp == 1:
        return 1.0
    if lay.schedule == "gpipe":
        return float(m)
    if lay.schedule == "interleaved_1f1b":
        chunks = (lay.virtual - 1) * lay.pp + 2 * (lay.pp - 1 - stage) + 1
        return min(chunks, m * lay.virtual) / lay.virtual
    return float(min(lay.pp - stage, m))


def block_activation_bytes(w: Workload, lay: Layout, tokens: int) -> float:
    """Bytes one block saves for backward over ``tokens`` (this rank's tokens of a micro-batch:
    Ulysses keeps S/sp of each sequence, Megatron sequence parallelism splits the norms)."""
    cfg, bf16 = w.cfg, w.dtype == "bf16"
    ab = 2 if bf16 else 4
    norm_split = lay.tp if lay.sp_norms else 1
    norms = 2 * (3 * cfg.dim * 4 + (cfg.dim * 2 if bf16 else 0) + 4) / norm_split
    heads = cfg.n_heads // lay.tp
    attn = 5 * heads * cfg.head_dim * ab + heads * 4
    if hasattr(cfg, "n_experts"):
        k, h = cfg.top_k, cfg.moe_ffn_hidden // lay.tp
        ffn = k * (4 * h * ab + 3 * cfg.dim * ab) + 4 * cfg.n_experts * 4
    else:
        ffn = 4 * (cfg.ffn_hidden // lay.tp) * ab
    return tokens * (norms + attn + ffn)


def _head_bytes(w: Workload, lay: Layout, tokens: int) -> float:
    """The last stage's final norm and loss: the log-probabilities (fp32, vocabulary / tp)
    and, under bf16, the bf16 logits."""
    vocab = -(-w.cfg.vocab_size // lay.tp) * lay.tp // lay.tp
    norm = (3 * w.cfg.dim * 4 + (w.cfg.dim * 2 if w.dtype == "bf16" else 0)) / (
        lay.tp if lay.sp_norms else 1
    )
    return tokens * (norm + vocab * (4 + (2 if w.dtype == "bf16" else 0)))


def activation_bytes(w: Workload, lay: Layout, stage: int) -> float:
    """Peak saved-for-backward bytes of one pipeline rank."""
    tokens = w.micro_rows(lay) * w.seq_len // lay.sp
    layers = w.cfg.n_layers // lay.pp
    block = block_activation_bytes(w, lay, tokens)
    if lay.recompute:
        resid = tokens * w.cfg.dim * 4 / (lay.tp if lay.sp_norms else 1)
        stage_bytes = layers * resid * _in_flight(w, lay, stage) + block
    else:
        stage_bytes = layers * block * _in_flight(w, lay, stage)
    if stage == lay.pp - 1:
        stage_bytes += _head_bytes(w, lay, tokens)
    return stage_bytes


def memory(w: Workload, lay: Layout) -> Memory:
    """Per-rank memory of the most loaded pipeline rank (by device total)."""
    best: Memory | None = None
    for stage in sorted({0, lay.pp - 1}):
        mem = _memory_of_stage(w, lay, stage)
        if best is None or mem.total > best.total:
            best = mem
    assert best is not None
    return best


def _memory_of_stage(w: Workload, lay: Layout, stage: int) -> Memory:
    sharded, unsharded_block, _ = _stage_params(w, lay, stage)
    params = sharded * 4
    mem = Memory()
    mem.device["params"] = params
    mem.device["grads"] = params
    if w.offload == "none":
        mem.device["optim"] = 2 * params
    else:  # host tiers: master copy + both moments (interleaved may keep some on the device)
        mem.device["optim"] = 0.0
        mem.host["optim"] = 3 * params
    mem.device["activations"] = activation_bytes(w, lay, stage)
    mem.device["buffers"] = _buffer_bytes(w, lay, unsharded_block, params)
    return mem


def _buffer_bytes(w: Workload, lay: Layout, unsharded_block: float, params: float) -> float:
    """FSDP2: two all-gathered blocks and one block's unsharded gradients (fp32); DDP: its
    buckets (one more copy of the gradients); bf16 autocast: the bf16 weight copies the graph
    saves (every block of the stage, once; one block with recompute)."""
    out = 0.0
    if lay.uses_fsdp:
        out += 3 * unsharded_block * 4
    elif lay.dp_replicate > 1:
        out += params
    if w.dtype == "bf16":
        layers = 1 if lay.recompute else w.cfg.n_layers // lay.pp
        out += unsharded_block * 2 * layers
    return out


# -- communication ----------------------------------------------------------------------------------
def _ring_ar(n: int) -> float:
    return 2 * (n - 1) / n if n > 1 else 0.0


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def comm_bytes(w: Workload, lay: Layout) -> dict[str, float]:
    """Bytes each rank sends per optimizer step, by dimension (the most loaded stage)."""
    cfg, ab = w.cfg, (2 if w.dtype == "bf16" else 4)
    m, layers = w.n_micro(lay), cfg.n_layers // lay.pp
    tokens = w.micro_rows(lay) * w.seq_len // lay.sp
    act = tokens * cfg.dim * ab
    fwd_passes = 2 if lay.recompute else 1
    moe = hasattr(cfg, "n_experts")
    out = dict.fromkeys(("tp", "sp", "pp", "dp_shard", "dp_replicate", "ep"), 0.0)
    if lay.tp > 1:  # per block: attention 1 all-reduce fwd + 1 bwd, FFN the same (MoE: on k copies)
        ffn = cfg.top_k if moe else 1
        per_block = (1 + ffn) * (fwd_passes + 1) * act
        out["tp"] = m * (layers * per_block + 2 * act) * _ring_ar(lay.tp)
    if lay.sp > 1:  # Ulysses: q, k, v in and the output back, forward (and recompute) + backward
        heads = (2 * cfg.n_heads + 2 * cfg.n_kv_heads) / lay.tp
        per_block = tokens * heads * cfg.head_dim * ab * (fwd_passes + 1)
        out["sp"] = m * layers * per_block * _ring(lay.sp)
    if lay.pp > 1:  # activations forward, their gradients back, at every chunk boundary
        out["pp"] = m * 2 * act * lay.virtual / (lay.tp if lay.sp_norms else 1)
    if lay.ep > 1:  # dispatch + combine, forward (and recompute) + backward
        out["ep"] = m * layers * 2 * (fwd_passes + 1) * cfg.top_k * act * _ring(lay.ep)
    _data_parallel_bytes(w, lay, out)
    return out


def _data_parallel_bytes(w: Workload, lay: Layout, out: dict[str, float]) -> None:
    """FSDP2 all-gathers every block forward and backward and reduce-scatters its gradients per
    micro-batch (in a pipeline: gradients once per step); HSDP/DDP all-reduce per micro-batch;
    expert shards all-reduce over the data ranks that hold them."""
    m = w.n_micro(lay)
    sharded, unsharded_block, expert = _stage_params(w, lay, 0)
    layers = w.cfg.n_layers // lay.pp
    full = (sharded - expert) * 4 * (lay.fsdp_size if lay.fsdp_size > 1 else 1)
    full = max(full, unsharded_block * layers * 4)
    if lay.fsdp_size > 1:
        scatters = 1 if lay.pp > 1 else m
        out["dp_shard"] = (2 * m + scatters) * full * _ring(lay.fsdp_size)
    if lay.dp_replicate > 1:
        reduces = 1 if lay.pp > 1 else m
        out["dp_replicate"] = reduces * full / lay.fsdp_size * _ring_ar(lay.dp_replicate)
    edp = lay.dp * lay.sp // lay.ep
    if expert and edp > 1:
        out["ep"] += m * expert * 4 * _ring_ar(edp)


def link_of(lay: Layout, dim: str, gpus_per_node: int) -> str:
    """``nvlink`` when every group of ``dim`` sits inside one node, else ``ib``. Mesh order
    ``pp, dp_replicate, dp_shard, sp, tp`` (tp innermost); FSDP's group is dp_shard x sp; ep
    borrows dp_shard x sp innermost first."""
    inner = {"tp": 1, "sp": lay.tp, "dp_shard": lay.tp, "ep": lay.tp}
    inner["dp_replicate"] = lay.tp * lay.sp * lay.dp_shard
    inner["pp"] = lay.tp * lay.sp * lay.dp
    size = {"tp": lay.tp, "sp": lay.sp, "dp_shard": lay.fsdp_size, "ep": lay.ep}
    size.update(dp_replicate=lay.dp_replicate, pp=lay.pp)
    if dim == "pp":  # point-to-point between neighbours
        return "nvlink" if inner["pp"] * 2 <= gpus_per_node else "ib"
    return "nvlink" if inner[dim] * size[dim] <= gpus_per_node else "ib"


# -- time -------------------------------------------------------------------------------------------
@dataclass
class StepTime:
    """Predicted seconds of one optimizer step, by part."""

    compute: float
    bubble: float
    exposed_comm: float
    optimizer: float
    comm: dict[str, float]

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.exposed_comm + self.optimizer


def step_time(
    w: Workload,
    lay: Layout,
    gpu: GPU,
    gpus_per_node: int,
    eff: Efficiency = EFFICIENCY,
) -> StepTime:
    """Compute (hardware FLOPs at ``eff.compute`` of the peak), pipeline bubble, the
    collectives not hidden behind compute, and the optimizer step."""
    flops = gpt_step_flops(w.cfg, w.global_batch, w.seq_len, lay.recompute).hardware / lay.world
    peak = gpu.peak_tflops[w.dtype] * 1e12
    compute = flops / (peak * eff.compute)
    m = w.n_micro(lay)
    bubble = compute * (lay.pp - 1) / (m * lay.virtual) if lay.pp > 1 else 0.0
    comm_s = {}
    for dim, nbytes in comm_bytes(w, lay).items():
        bw = gpu.nvlink_gbps if link_of(lay, dim, gpus_per_node) == "nvlink" else gpu.ib_gbps
        comm_s[dim] = nbytes / (bw * 1e9)
    hidden = comm_s["dp_shard"] + comm_s["dp_replicate"]
    exposed = max(0.0, hidden - eff.overlap * compute)
    exposed += comm_s["tp"] + comm_s["sp"] + comm_s["pp"] + comm_s["ep"]
    mem = memory(w, lay)
    params = mem.device["params"]
    if w.offload == "none":  # read p, g, m, v; write p, m, v
        opt = 7 * params / (gpu.hbm_gbps * 1e9)
    else:  # gradients down, parameters up, the host update over master + moments
        opt = 2 * params / (gpu.pcie_gbps * 1e9) + 3 * params / (eff.cpu_adam_gbps * 1e9)
    return StepTime(compute, bubble, exposed, opt, comm_s)


def with_overrides(gpu: GPU, eff: Efficiency, values: dict[str, float]) -> tuple[GPU, Efficiency]:
    """``--set nvlink_gbps=300 compute=0.45 ...``: GPU or Efficiency fields by name."""
    g: dict[str, Any] = {}
    e: dict[str, float] = {}
    numeric = set(GPU.__dataclass_fields__) - {"name"}
    for key, value in values.items():
        if key == "peak_tflops":  # one peak for every dtype
            g[key] = {"bf16": value, "fp32": value}
        elif key in numeric:
            g[key] = value
        elif key in Efficiency.__dataclass_fields__:
            e[key] = value
        else:
            known = sorted(numeric | set(Efficiency.__dataclass_fields__))
            raise KeyError(f"--set {key}=...: not a planner constant; use one of {known}")
    return replace(gpu, **g), replace(eff, **e)
