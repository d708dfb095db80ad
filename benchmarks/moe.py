"""MoE block throughput: GRIN SparseMixer-v2 vs plain top-2 softmax routing vs a naive
per-token loop (the dense reference ``sum_k w_k Expert_{i_k}(x)``), forward + backward.

One run measures all three on the same block and batch, interleaved, ``--repeats`` times, and
writes medians and ratios to ``benchmarks/results/moe.json`` and ``.md``.

    python benchmarks/moe.py            # CPU; on a GPU box add --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.moe import MoE, dense_moe_reference, sparsemixer_v2, topk_softmax


def _step(moe: MoE, x: torch.Tensor, naive: bool) -> None:
    moe.zero_grad(set_to_none=True)
    y = dense_moe_reference(moe, x) if naive else moe(x)
    loss = y.square().mean() + (moe.aux_loss if moe.aux_loss is not None and not naive else 0)
    loss.backward()


def _time(moe: MoE, x: torch.Tensor, naive: bool, sync) -> float:
    sync()
    t0 = time.perf_counter()
    _step(moe, x, naive)
    sync()
    return x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--naive-tokens", type=int, default=32)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=352)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe"))
    a = ap.parse_args()
    dev = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    blocks = {}
    for name, router in (("sparsemixer_v2", "sparsemixer"), ("top2_softmax", "softmax")):
        torch.manual_seed(0)
        m = MoE(a.dim, a.hidden, a.experts, 2, router).to(dev)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02)
        blocks[name] = m.train()
    x = torch.randn(a.tokens, a.dim, device=dev)
    xn = x[: a.naive_tokens]
    runs = {"sparsemixer_v2": [], "top2_softmax": [], "naive_per_token_loop": []}
    for _ in range(3):  # warm-up
        for name in ("sparsemixer_v2", "top2_softmax"):
            _step(blocks[name], x, False)
    for i in range(a.repeats):  # interleaved, order alternating: load drifts hit both
        order = (
            ("sparsemixer_v2", "top2_softmax") if i % 2 == 0 else ("top2_softmax", "sparsemixer_v2")
        )
        for name in order:
            runs[name].append(_time(blocks[name], x, False, sync))
    # per back-to-back pair: time(SparseMixer-v2) / time(top-2) - 1 (robust to slow drifts)
    pair_overhead = [t2 / sm - 1.0 for sm, t2 in zip(runs["sparsemixer_v2"], runs["top2_softmax"])]
    for _ in range(max(3, a.repeats // 5)):
        runs["naive_per_token_loop"].append(_time(blocks["top2_softmax"], xn, True, sync))
    med = {k: statistics.median(v) for k, v in runs.items()}
    # the routers alone (forward + backward on the (T, E) logits), interleaved
    logits = torch.randn(a.tokens, a.experts, device=dev, requires_grad=True)
    routers = {
        "sparsemixer_v2": lambda: sparsemixer_v2(logits, 0.01, True),
        "top2_softmax": lambda: topk_softmax(logits, 2),
    }
    router_ms: dict[str, list[float]] = {k: [] for k in routers}
    for _ in range(10 * a.repeats):
        for name, fn in routers.items():
            sync()
            t0 = time.perf_counter()
            w, _ = fn()
            w.sum().backward()
            sync()
            router_ms[name].append(1e3 * (time.perf_counter() - t0))
    router_med = {k: statistics.median(v) for k, v in router_ms.items()}
    block_ms = 1e3 * a.tokens / med["top2_softmax"]
    router_share = (router_med["sparsemixer_v2"] - router_med["top2_softmax"]) / block_ms
    res = {
        "config": vars(a) | {"torch": torch.__version__, "threads": torch.get_num_threads()},
        "tokens_per_s_median": med,
        "tokens_per_s_all": runs,
        "grin_overhead_vs_top2": med["top2_softmax"] / med["sparsemixer_v2"] - 1.0,
        "grin_overhead_vs_top2_median_of_pairs": statistics.median(pair_overhead),
        "speedup_vs_naive_loop": med["sparsemixer_v2"] / med["naive_per_token_loop"],
        "router_ms_median": router_med,
        "router_extra_time_share_of_top2_block": router_share,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    lines = [
        "# MoE block throughput (forward + backward, tokens/s, median)",
        "",
        f"device {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"T={a.tokens}, D={a.dim}, H={a.hidden}, E={a.experts}, top-2, {a.repeats} repeats "
        f"(naive loop on {a.naive_tokens} tokens)",
        "",
        "| routing | tokens/s |",
        "| --- | ---: |",
        *[f"| {k} | {v:,.0f} |" for k, v in med.items()],
        "",
        "GRIN SparseMixer-v2 overhead over plain top-2 (ratio of medians): "
        f"{100 * res['grin_overhead_vs_top2']:.1f}%",
        "GRIN SparseMixer-v2 overhead over plain top-2 (median over back-to-back pairs): "
        f"{100 * res['grin_overhead_vs_top2_median_of_pairs']:.1f}%",
        "routers alone (fwd + bwd, ms, median): "
        + ", ".join(f"{k} {v:.3f}" for k, v in router_med.items())
        + f"; SparseMixer-v2's extra router time = {100 * router_share:.2f}% of a top-2 block step",
        f"dropless grouped block vs naive per-token loop: {res['speedup_vs_naive_loop']:.1f}x",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
