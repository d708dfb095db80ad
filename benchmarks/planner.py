"""The planner against torchtitan's published Llama 3.1 throughput, and its layout choices.

Published figures: torchtitan ``docs/performance.md`` (github.com/pytorch/torchtitan, commit
eaea6f6a, "Versions used": torchtitan 9dec370, torch 1963fc8, December 2024), H100 96 GB HBM2e
at 500 W, 8 per host, 400 Gb/s RDMA per GPU, sequence length 8192:

- Table 1, Llama 3.1 8B, 8 GPUs, FSDP, local batch 2 (global 16), selective AC, bf16, no
  compile: **5,762** tokens/s/GPU;
- Table 4, Llama 3.1 70B, 256 GPUs, FSDP 32 x TP 8, local batch 16 (global 512), full AC,
  torch.compile + Float8: **829**;
- Table 5, Llama 3.1 405B, 512 GPUs, FSDP 8 x TP 8 x PP 8, local batch 32 (global 256), full
  AC, torch.compile + Float8 + AsyncTP: **100** (1F1B), **128** (interleaved 1F1B).

Lattice has no Float8, no torch.compile of the whole step, no selective AC and no uneven
pipeline stages, so each case is planned as close as Lattice can run it: the published degrees
where they are valid Lattice layouts (else the search's best on that cluster), bf16, full
recompute where the published run recomputed anything, the largest micro-batch that fits. The
ratio is predicted / published; the compute efficiency is one constant
(``train.plan_model.Efficiency.compute``) calibrated on the 8B row only.

    python benchmarks/planner.py     # writes benchmarks/results/planner.{json,md}
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
SOURCE = "torchtitan docs/performance.md @ eaea6f6a (torchtitan 9dec370, 2024-12-26)"

LLAMA3 = {
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672),
    "405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_hidden=53248),
}
"""Llama 3 / 3.1 architectures (Meta's params.json): vocabulary 128256, rope theta 500000."""


def llama3(size: str, global_batch: int, micro_batch: int, seq_len: int = 8192) -> list[str]:
    """Hydra overrides of a Llama 3 model in bf16 (the trainer's own config keys)."""
    m = [f"model.{k}={v}" for k, v in LLAMA3[size].items()]
    m += ["model.vocab_size=128256", "model.rope_theta=500000.0", f"model.max_seq_len={seq_len}"]
    t = [f"train.seq_len={seq_len}", f"train.global_batch_size={global_batch}"]
    return m + t + [f"train.micro_batch_size={micro_batch}", "train.dtype=bf16"]


# (case, published tokens/s/GPU, world, nodes, global batch, published degrees, recompute,
#  what the published run had that Lattice lacks)
T8P8F8 = dict(tp=8, pp=8, dp_shard=8)
LACKS_405B = "torch.compile + Float8 + AsyncTP; 126 layers on 8 uneven stages"
CASES = [
    ("llama3_8b_fsdp8", 5762, 8, 1, 16, dict(tp=1, pp=1, dp_shard=8), True, "selective AC"),
    (
        "llama3_70b_fsdp32_tp8",
        829,
        256,
        32,
        512,
        dict(tp=8, pp=1, dp_shard=32),
        True,
        "torch.compile + Float8",
    ),
]
CASES += [
    (f"llama3_405b_fsdp8_tp8_pp8_{sched}", tps, 512, 64, 256, T8P8F8, True, LACKS_405B)
    for sched, tps in (("1f1b", 100), ("interleaved", 128))
]


def _size(case: str) -> str:
    return case.split("_")[1]


@cache
def _search_best(size: str, gbs: int, world: int, nodes: int):
    """The search's fastest fitting layout (cached: two cases share the 405B cluster)."""
    from train.cli import load_config
    from train.plan import make_cluster, search

    job, _ = load_config(llama3(size, gbs, 1))
    return search(job, make_cluster(world, "h100", nodes, {}))[0][0]


def plan_case(case: tuple) -> dict:
    """The planner's figure for one published case (see the module docstring)."""
    from models.errors import LatticeUserError
    from train.plan import Cluster, job_for, make_cluster, predict, validated
    from train.plan_model import Layout

    name, published, world, nodes, gbs, deg, recompute, lacks = case
    cluster: Cluster = make_cluster(world, "h100", nodes, {})
    from train.cli import load_config

    job, _ = load_config(llama3(_size(name), gbs, 1))
    dp = world // (deg["tp"] * deg["pp"])
    tried, plan, note = [], None, "published degrees"
    for mbs in (16, 8, 4, 2, 1):
        c = Layout(tp=deg["tp"], pp=deg["pp"], dp_shard=dp, micro_batch=mbs, recompute=recompute)
        c = replace(c, sp_norms=deg["tp"] > 1)
        try:
            work, lay = validated(job_for(job, c), cluster)
        except LatticeUserError as exc:
            tried.append(str(exc))
            continue
        p = predict(work, lay, cluster)
        if p.fits:
            plan = p
            break
    if plan is None:
        plan = _search_best(_size(name), gbs, world, nodes)
        note = "search's best (published degrees: " + (tried[-1] if tried else "do not fit") + ")"
    return {
        "case": name,
        "published_tokens_per_s_per_gpu": published,
        "published_layout": deg,
        "published_extras_lattice_lacks": lacks,
        "planned_layout": plan.layout.label(),
        "planned_from": note,
        "predicted_tokens_per_s_per_gpu": round(plan.tokens_per_s_per_gpu, 1),
        "ratio_predicted_over_published": round(plan.tokens_per_s_per_gpu / published, 3),
        "within_30pct": abs(plan.tokens_per_s_per_gpu / published - 1) <= 0.30,
        "predicted_mfu": round(plan.mfu, 4),
        "predicted_memory_gib": round(plan.memory.total / 2**30, 1),
    }


def choices() -> list[dict]:
    """The search's pick for 8B on 8 x H100 (and H200), 405B on 64 x 8 H100."""
    from train.cli import load_config
    from train.plan import make_cluster, search

    out = []
    for label, size, world, nodes, gpu, gbs in [
        ("8b_8xh100", "8b", 8, 1, "h100", 16),
        ("8b_8xh200", "8b", 8, 1, "h200", 16),
        ("405b_64x8h100", "405b", 512, 64, "h100", 256),
    ]:
        job, _ = load_config(llama3(size, gbs, 1))
        fits, excluded = search(job, make_cluster(world, gpu, nodes, {}))
        out.append(
            {
                "case": label,
                "best": [p.layout.label() for p in fits[:5]],
                "best_tokens_per_s_per_gpu": [round(p.tokens_per_s_per_gpu) for p in fits[:5]],
                "excluded": dict(excluded),
            }
        )
    return out


def main() -> None:
    rows = [plan_case(c) for c in CASES]
    picks = choices()
    RESULTS.mkdir(exist_ok=True)
    data = {"source": SOURCE, "published_vs_predicted": rows, "search": picks}
    (RESULTS / "planner.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# Planner vs torchtitan's published Llama 3.1 throughput (H100)",
        "",
        f"Source: {SOURCE}. `python benchmarks/planner.py`. One constant set "
        "(`train/plan_model.py`); the compute efficiency is calibrated on the 8B row only.",
        "",
        "| case | published tok/s/GPU | planned layout (Lattice) | predicted | ratio | within 30% "
        "| published run also had |",
        "| --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['published_tokens_per_s_per_gpu']} | {r['planned_layout']} "
            f"({r['planned_from']}) | {r['predicted_tokens_per_s_per_gpu']} | "
            f"{r['ratio_predicted_over_published']} | {r['within_30pct']} | "
            f"{r['published_extras_lattice_lacks']} |"
        )
    lines += [
        "",
        "## Search picks",
        "",
        "| cluster | top layouts (tokens/s/GPU) |",
        "| --- | --- |",
    ]
    for p in picks:
        tops = "; ".join(f"{a} ({b})" for a, b in zip(p["best"], p["best_tokens_per_s_per_gpu"]))
        lines.append(f"| {p['case']} | {tops} |")
    (RESULTS / "planner.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
