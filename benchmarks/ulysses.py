"""Ulysses: ours vs DeepSpeed's ``DistributedAttention``, bytes per rank, peak activation memory.

1. Equality and speed: on ``--sp`` gloo ranks, identical (B, S/sp, H, D) q/k/v slices go through
   our ``UlyssesAttention`` and DeepSpeed's ``deepspeed.sequence.layer.DistributedAttention``
   (same local attention: models.gpt.CoreAttention). Outputs and q/k/v gradients are compared;
   forward+backward step time is measured ``--repeats`` times each, interleaved (the order flips
   every repeat), after warm-up; medians in milliseconds and their ratio.
2. Communication: one GPT layer forward+backward for (sp, seq_len) = (2, 2L), (4, 4L), (8, 8L),
   with every collective counted where it is called (``torch.distributed.all_to_all_single`` /
   ``all_gather_single`` / ``reduce_scatter_single`` are wrapped). Two numbers per rank and layer:
   (a) payload, the bytes a rank hands to the collective (its input tensor), and (b) off-rank
   bytes, the part that has to leave the rank ((n-1)/n of an all-to-all or reduce-scatter input,
   (n-1) times an all-gather input). The same count is made for a real all-gather based sequence
   parallel attention (``AllGatherSPAttention`` below: each rank all-gathers K and V along the
   sequence, Megatron context parallelism without the ring, runs causal attention for its own
   queries, and reduce-scatters dK/dV in backward). Both sharded models are checked against the
   single-process model (logits on the local tokens and all-reduced parameter gradients).
3. Activation memory at a fixed global seq_len for sp = 1, 2, 4: bytes saved for backward
   (``saved_tensors_hooks``) and the real allocator peak over forward+backward: on CPU the peak of
   live bytes from the profiler's allocation events (``profile_memory=True``; cumulative sum of
   allocation and free sizes in time order, relative to the start), on CUDA
   ``torch.cuda.max_memory_allocated``. Both per rank, as fractions of sp=1.

    python benchmarks/ulysses.py --sp 2 --repeats 30
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import median, write_results  # noqa: E402
from models.gpt import GPT, CoreAttention, GPTConfig  # noqa: E402
from parallelism.ulysses import UlyssesAttention, apply_ulysses, sequence_slice  # noqa: E402
from tests.distributed.harness import run_on_ranks  # noqa: E402


# -- collective byte counter ---------------------------------------------------------------------
def _off_rank_share(name: str, n: int, nbytes: int) -> int:
    if name == "all_gather_single":  # my chunk has to reach n-1 peers (a ring forwards n-1 chunks)
        return nbytes * (n - 1)
    return nbytes * (n - 1) // n  # all-to-all / reduce-scatter: n-1 of my n chunks go elsewhere


@contextmanager
def count_collectives(stats: dict[str, int]) -> Iterator[dict[str, int]]:
    """Add to ``stats['payload']`` the bytes this rank hands to each collective (its input) and to
    ``stats['off_rank']`` the part of them that leaves the rank, while the block runs."""
    names = ("all_to_all_single", "all_gather_single", "reduce_scatter_single")
    originals = {name: getattr(dist, name) for name in names}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        in_arg = "input_tensor" if name == "all_gather_single" else "input"

        def counted(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs).arguments
            inp = bound[in_arg]
            n = dist.get_world_size(bound.get("group"))
            nbytes = inp.numel() * inp.element_size()
            stats["payload"] += nbytes
            stats["off_rank"] += _off_rank_share(name, n, nbytes)
            stats["calls"] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield stats
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# -- the all-gather based baseline ---------------------------------------------------------------
class _GatherSeq(torch.autograd.Function):
    """(B, S/sp, K, D) -> (B, S, K, D) by all-gather; backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx: Any, x_BsKD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        sp = dist.get_world_size(group)
        x = x_BsKD.transpose(0, 1).contiguous()  # (s, B, K, D): gather along dim 0
        out = x.new_empty((sp * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x, group=group)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx: Any, g_BSKD: torch.Tensor) -> tuple[torch.Tensor, None]:
        sp = dist.get_world_size(ctx.group)
        g = g_BSKD.transpose(0, 1).contiguous()  # (S, B, K, D)
        out = g.new_empty((g.shape[0] // sp, *g.shape[1:]))
        dist.reduce_scatter_single(out, g, group=ctx.group)  # sum of every rank's dK for my slice
        return out.transpose(0, 1), None


class AllGatherSPAttention(nn.Module):
    """Sequence-parallel causal attention by all-gathering K and V (no ring, no head swap).

    Takes the same sequence-sharded (B, S/sp, H, D) q and (B, S/sp, K, D) k/v as the model's
    ``CoreAttention`` seam and returns this rank's (B, S/sp, H, D) output.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rank, s = dist.get_rank(self.group), q.shape[1]
        end = (rank + 1) * s  # causal: my queries never look past my last token
        k, v = (_GatherSeq.apply(t, self.group)[:, :end] for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        q_pos = torch.arange(rank * s, end, device=q.device)
        mask = torch.arange(end, device=q.device)[None, :] <= q_pos[:, None]  # (s, end)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2)


# -- 1. ours vs DeepSpeed ------------------------------------------------------------------------
def _vs_deepspeed(rank: int, world: int, shape: tuple[int, ...], repeats: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.set_num_threads(1)
    B, S, H, D = shape
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]
    grad_out = torch.randn(B, S, H, D, generator=g)
    sl = sequence_slice(S, rank, world)
    group = dist.group.WORLD
    layers = {
        "ours": (UlyssesAttention(CoreAttention(), group), False),
        "deepspeed": (
            DistributedAttention(CoreAttention(), group, scatter_idx=2, gather_idx=1),
            True,
        ),
    }

    def step(name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        layer, ds = layers[name]
        q, k, v = (t[:, sl].clone().requires_grad_() for t in full)
        out = layer(q, k, v, batch_dim_idx=0) if ds else layer(q, k, v)
        out.backward(grad_out[:, sl])
        return out.detach(), [t.grad for t in (q, k, v)]

    o1, g1 = step("ours")
    o2, g2 = step("deepspeed")
    diff = max(
        [(o1 - o2).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(g1, g2)]
    )
    for _ in range(2):  # warm-up
        step("ours"), step("deepspeed")
    times: dict[str, list[float]] = {"ours": [], "deepspeed": []}
    for i in range(repeats):
        for name in ("ours", "deepspeed") if i % 2 == 0 else ("deepspeed", "ours"):
            dist.barrier()
            t0 = time.perf_counter()
            step(name)
            dist.barrier()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {
        "max_abs_diff": diff,
        "ours_step_ms": times["ours"],
        "deepspeed_step_ms": times["deepspeed"],
    }


# -- 2. bytes per rank per layer -----------------------------------------------------------------
def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _bytes(rank: int, world: int, base_seq: int) -> dict:
    """Count one layer's forward+backward collectives under Ulysses and all-gather SP, and check
    both against the single-process layer (same weights, tokens and loss weights)."""
    torch.set_num_threads(1)
    cfg = GPTConfig(vocab_size=256, dim=128, n_layers=1, n_heads=8, n_kv_heads=8)
    S = base_seq * world
    group = dist.group.WORLD
    sl = sequence_slice(S, rank, world)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (1, S), generator=gen)
    weights = torch.randn(1, S, cfg.vocab_size, generator=gen)  # loss = sum(logits * weights)

    def model() -> GPT:
        torch.manual_seed(0)
        return GPT(cfg)

    ref = model()
    ref_logits = ref(tokens)
    (ref_logits.float() * weights).sum().backward()

    out: dict[str, Any] = {}
    for name in ("ulysses", "allgather"):
        m = model()
        if name == "ulysses":
            apply_ulysses(m, group)
        else:
            for block in m.layers.values():
                block.attention.core = AllGatherSPAttention(group)
        stats = {"payload": 0, "off_rank": 0, "calls": 0}
        with count_collectives(stats):
            logits = m(tokens[:, sl], torch.arange(sl.start, sl.stop))
            (logits.float() * weights[:, sl]).sum().backward()
        grad_rel = 0.0
        for p, p_ref in zip(m.parameters(), ref.parameters()):
            dist.all_reduce(p.grad, group=group)  # sp ranks hold partial sums of every gradient
            grad_rel = max(grad_rel, _max_rel(p.grad, p_ref.grad))
        out[name] = {
            **stats,
            "logits_max_rel_diff": _max_rel(logits.detach(), ref_logits[:, sl].detach()),
            "grads_max_rel_diff": grad_rel,
        }
    return out


# -- 3. activation memory ------------------------------------------------------------------------
def _profiler_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of live CPU bytes allocated while ``fn`` runs, from the profiler's allocation events
    (each carries a signed size: + on allocation, - on free), relative to the start."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def peak_allocated_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Allocator-level peak of bytes allocated by ``fn`` above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _profiler_peak_bytes(fn)


def _activation_memory(rank: int, world: int, seq_len: int) -> dict[str, int]:
    torch.set_num_threads(1)
    cfg = GPTConfig(vocab_size=256, dim=128, n_layers=2, n_heads=8, n_kv_heads=8)
    torch.manual_seed(0)
    model = GPT(cfg)
    if world > 1:
        apply_ulysses(model, dist.group.WORLD)
    sl = sequence_slice(seq_len, rank, world)
    x = torch.randint(0, 256, (2, seq_len))[:, sl]
    pos = torch.arange(sl.start, sl.stop)

    def loss() -> torch.Tensor:
        return model(x, pos).float().logsumexp(-1).mean()

    loss().backward()  # warm-up: lazily created state is not counted below
    model.zero_grad(set_to_none=True)

    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # hold references so storages are not freed and reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep.append(t)
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    value.backward()
    saved = sum(v for k, v in seen.items() if k not in params)
    keep.clear()
    del value
    model.zero_grad(set_to_none=True)

    peak = peak_allocated_bytes(lambda: loss().backward(), torch.device("cpu"))
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    return {"saved_for_backward_bytes": saved, "peak_bytes": peak, "param_grad_bytes": grad_bytes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument(
        "--shape", type=int, nargs=4, default=[2, 2048, 8, 64], metavar=("B", "S", "H", "D")
    )
    args = ap.parse_args()

    r0 = run_on_ranks(_vs_deepspeed, args.sp, tuple(args.shape), args.repeats, timeout_s=600)[0]
    ours_ms, ds_ms = median(r0["ours_step_ms"]), median(r0["deepspeed_step_ms"])
    ratio = ours_ms / ds_ms
    paired = median([a / b for a, b in zip(r0["ours_step_ms"], r0["deepspeed_step_ms"])])
    print(
        f"ours {ours_ms:.1f} ms  deepspeed {ds_ms:.1f} ms  ratio {ratio:.3f} (paired {paired:.3f})"
        f"  max|diff| {r0['max_abs_diff']:.2e}"
    )

    base_seq = 256
    comm = []
    for sp in (2, 4, 8):
        b = run_on_ranks(_bytes, sp, base_seq, timeout_s=300)
        for scheme in ("ulysses", "allgather"):  # every rank counts the same; check it
            assert len({(r[scheme]["payload"], r[scheme]["off_rank"]) for r in b}) == 1, b
            worst = max(
                max(r[scheme]["logits_max_rel_diff"], r[scheme]["grads_max_rel_diff"]) for r in b
            )
            assert worst < 1e-4, f"{scheme} sp={sp} differs from single process: {worst:.2e}"
        row: dict[str, Any] = {"sp": sp, "seq_len": base_seq * sp}
        for scheme in ("ulysses", "allgather"):
            row[f"{scheme}_payload_bytes"] = b[0][scheme]["payload"]
            row[f"{scheme}_off_rank_bytes"] = b[0][scheme]["off_rank"]
            row[f"{scheme}_collective_calls"] = b[0][scheme]["calls"]
            row[f"{scheme}_max_rel_diff_vs_single_process"] = max(
                max(r[scheme]["logits_max_rel_diff"], r[scheme]["grads_max_rel_diff"]) for r in b
            )
        comm.append(row)
        print(row)

    def spread(key: str) -> float:
        return max(abs(c[key] / comm[0][key] - 1) for c in comm)

    def growth(key: str) -> float:
        return comm[-1][key] / comm[0][key]

    mem_seq = 1024
    mem = []
    for sp in (1, 2, 4):
        per_rank = run_on_ranks(_activation_memory, sp, mem_seq, timeout_s=300)
        mem.append(
            {
                "sp": sp,
                "saved_for_backward_bytes_per_rank": max(
                    r["saved_for_backward_bytes"] for r in per_rank
                ),
                "peak_bytes_per_rank": max(r["peak_bytes"] for r in per_rank),
                "param_grad_bytes": per_rank[0]["param_grad_bytes"],
            }
        )
    for m in mem:
        m["saved_fraction_of_sp1"] = (
            m["saved_for_backward_bytes_per_rank"] / mem[0]["saved_for_backward_bytes_per_rank"]
        )
        m["peak_fraction_of_sp1"] = m["peak_bytes_per_rank"] / mem[0]["peak_bytes_per_rank"]
        m["ideal_1_over_sp"] = 1 / m["sp"]
        print(m)

    data = {
        "shape_BSHD": args.shape,
        "sp": args.sp,
        "repeats": args.repeats,
        "ours_step_ms_median": ours_ms,
        "deepspeed_step_ms_median": ds_ms,
        "ratio_of_medians_ours_over_deepspeed": ratio,
        "median_of_paired_ratios_ours_over_deepspeed": paired,
        "max_abs_diff_outputs_and_grads": r0["max_abs_diff"],
        "ours_step_ms": r0["ours_step_ms"],
        "deepspeed_step_ms": r0["deepspeed_step_ms"],
        "comm_per_rank_per_layer_fwd_bwd": comm,
        "ulysses_payload_max_relative_spread": spread("ulysses_payload_bytes"),
        "ulysses_off_rank_growth_sp8_over_sp2": growth("ulysses_off_rank_bytes"),
        "allgather_payload_growth_sp8_over_sp2": growth("allgather_payload_bytes"),
        "allgather_off_rank_growth_sp8_over_sp2": growth("allgather_off_rank_bytes"),
        "activation_memory_seq_len": mem_seq,
        "activation_memory": mem,
    }
    table = [
        {"measure": "fwd+bwd attention step, ours (ms, median)", "value": ours_ms},
        {
            "measure": "fwd+bwd attention step, DeepSpeed DistributedAttention (ms, median)",
            "value": ds_ms,
        },
        {"measure": "ratio of medians ours / DeepSpeed (target <= 1.1)", "value": ratio},
        {"measure": "median of per-repeat ratios ours / DeepSpeed", "value": paired},
        {
            "measure": "max |ours - DeepSpeed| over outputs and q/k/v grads",
            "value": r0["max_abs_diff"],
        },
        {
            "measure": "(a) Ulysses payload per rank per layer: spread over sp=2,4,8 (target < 1%)",
            "value": spread("ulysses_payload_bytes"),
        },
        {
            "measure": "(b) Ulysses off-rank bytes: sp=8 / sp=2 (= (7/8)/(1/2))",
            "value": growth("ulysses_off_rank_bytes"),
        },
        {
            "measure": "all-gather SP payload: sp=8 / sp=2",
            "value": growth("allgather_payload_bytes"),
        },
        {
            "measure": "all-gather SP off-rank bytes: sp=8 / sp=2",
            "value": growth("allgather_off_rank_bytes"),
        },
    ]
    for m in mem:
        table.append(
            {
                "measure": f"peak / saved-for-backward bytes per rank, sp={m['sp']} "
                f"(fraction of sp=1; ideal {m['ideal_1_over_sp']:.3f})",
                "value": f"{m['peak_bytes_per_rank']:,} ({m['peak_fraction_of_sp1']:.3f}) / "
                f"{m['saved_for_backward_bytes_per_rank']:,} ({m['saved_fraction_of_sp1']:.3f})",
            }
        )
    comm_md = "\n".join(
        [
            "| sp | seq_len | Ulysses (a) payload | Ulysses (b) off-rank | all-gather SP (a) payload "
            "| all-gather SP (b) off-rank | max rel. diff vs single process (Ulysses / all-gather) |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {c['sp']} | {c['seq_len']} | {c['ulysses_payload_bytes']:,} | "
                f"{c['ulysses_off_rank_bytes']:,} | {c['allgather_payload_bytes']:,} | "
                f"{c['allgather_off_rank_bytes']:,} | {c['ulysses_max_rel_diff_vs_single_process']:.1e}"
                f" / {c['allgather_max_rel_diff_vs_single_process']:.1e} |"
                for c in comm
            ),
        ]
    )
    notes = (
        f"Step time and equality: {args.sp} gloo ranks on CPU, q/k/v (B,S,H,D)={tuple(args.shape)}, "
        f"fp32, {args.repeats} interleaved repeats each after 2 warm-ups.\n\n"
        "Bytes per rank per GPT layer (dim 128, 8 heads, batch 1), forward + backward, counted at "
        "the torch.distributed calls. (a) payload = bytes a rank hands to the collective (its input); "
        "(b) off-rank = the part that must leave the rank: (sp-1)/sp of an all-to-all or "
        "reduce-scatter input, (sp-1) x an all-gather input. (a) for Ulysses is the paper's "
        "'per-link communication volume M/P' (4 all-to-alls of N*h/P per layer forward, 4 more "
        "backward): constant as seq_len and sp grow together. (b) for Ulysses is (sp-1)/sp of (a), "
        "so it rises from 1/2 to 7/8 of (a) but never exceeds it. The all-gather SP baseline "
        "(a real implementation: K/V all-gather forward, dK/dV reduce-scatter backward, checked "
        "equal to the single-process layer) grows linearly with sp in both counts.\n\n"
        + comm_md
        + f"\n\nActivation memory: 2-layer GPT, batch 2, global seq_len {mem_seq}, forward + "
        "backward. 'peak' = allocator-level peak of live bytes over forward+backward (CPU profiler "
        "allocation events, relative to the start; includes "
        f"{mem[0]['param_grad_bytes']:,} bytes of parameter gradients, the same for every sp); "
        "'saved-for-backward' = bytes of tensors autograd keeps for backward. Largest rank reported."
    )
    write_results("ulysses", data, table, notes=notes)


if __name__ == "__main__":
    main()
