"""Hugging Face interop: memory of ``model.from_hf`` on 4 ranks, and import/export time against
transformers' ``from_pretrained`` / ``save_pretrained`` of the same model, in one run.

The model: a random ``LlamaForCausalLM`` (default dim 1024, 16 layers, 16 heads / 8 KV heads,
FFN 2816, vocabulary 32000: ~250M parameters, ~1 GiB in fp32), written once by
``save_pretrained`` in 256 MB shards under a temporary folder.

Memory: 4 gloo ranks (``--layout``, default ``parallel.dp_shard=4``) each build the Lattice model
from the folder (``GPTFamily.build_model``: meta build, FSDP, allocation, each rank reading its
shard's byte ranges). Each rank's peak extra RSS is the kernel's high-water mark (``VmHWM``,
reset through ``/proc/self/clear_refs`` just before) minus its RSS then; it is compared with its
share (the bytes of its local parameters) plus the largest tensor of the model.

Speed (one process, one intra-op thread each, the page cache warm for both, methods in rotating
order, median of ``--repeats``): import = ``plan_run`` + ``build_model`` with ``model.from_hf`` vs
``AutoModelForCausalLM.from_pretrained(dtype=float32)``; export = ``checkpoint.export.export_hf``
of a Lattice checkpoint of that model vs ``save_pretrained`` of the HF model (same shard size),
with the export's peak extra RSS against one output shard.

Usage: python -m benchmarks.hf_interop [--layers 16 --dim 1024 --repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.checkpoint import PeakRSS
from benchmarks.common import median, write_results


def save_random_llama(path: Path, a: argparse.Namespace) -> int:
    """A random fp32 ``LlamaForCausalLM`` by ``save_pretrained`` (sharded); its parameters."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.dim,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=f"{a.shard_mb}MB")
    return n


def _overrides(hf: Path, tmp: Path, run: str, layout: list[str]) -> list[str]:
    return [
        f"model.from_hf={hf}",
        f"data.path={tmp / 'data'}",
        "data.max_bytes=400000",
        "train.seq_len=64",
        "train.global_batch_size=4",
        "train.micro_batch_size=1",
        f"run.dir={tmp / run}",
        *layout,
    ]


def lattice_import(overrides: list[str]) -> tuple[Any, Any, float, PeakRSS]:
    """(model, family, seconds, PeakRSS) of ``plan_run`` + ``build_model`` (the import)."""
    from train.cli import load_config
    from train.trainer import plan_run

    job, _ = load_config(overrides)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        plan = plan_run(job)
        if plan.dims.world_size > 1:
            plan.dims.build_mesh("cpu")
        model = plan.family.build_model(torch.device("cpu"))
        seconds = time.perf_counter() - t0
    return model, plan.family, seconds, mem


def _rank(rank: int, world: int, port: int, overrides: list[str], queue: Any) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, family, seconds, mem = lattice_import(overrides)
        share = sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel() * 4 for p in model.parameters()
        )
        largest = max(p.numel() * 4 for p in model.parameters())
        queue.put(
            {
                "rank": rank,
                "import_s": seconds,
                "peak_extra_mb": (mem.peak - mem.start) / 2**20,
                "share_mb": share / 2**20,
                "largest_tensor_mb": largest / 2**20,
                "bytes_read_mb": family.hf_bytes_read / 2**20,
            }
        )
    finally:
        dist.destroy_process_group()


def memory_on_ranks(overrides: list[str], world: int) -> list[dict]:
    """Import on ``world`` gloo ranks (spawned processes); per-rank figures."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_rank, args=(r, world, port, overrides, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    out = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"rank process exited with {p.exitcode}")
    return sorted(out, key=lambda r: r["rank"])


def save_checkpoint(model: Any, family: Any, root: Path) -> Path:
    """A Lattice checkpoint of ``model`` (what a run saves), for the export timing."""
    from checkpoint import Manager
    from checkpoint.format import committed_steps
    from train.config import CheckpointArgs

    mgr = Manager(
        CheckpointArgs(enabled=True, dir=str(root), keep_last=1),
        root.parent,
        config={"model": dataclasses.asdict(family.job.model)},
    )
    adapter = family.checkpoint_adapter(model)
    mgr.attach(model, torch.optim.AdamW(model.parameters()), adapter=adapter)
    mgr.save_async(1)
    mgr.wait()
    mgr.finalize()
    return committed_steps(root)[-1]


def _import_hf(hf_dir: Path, read_all: bool) -> float:
    """``from_pretrained`` seconds; ``read_all``: plus reading every weight once (transformers
    may hand back tensors still backed by the file's memory map, read on first use)."""
    import transformers

    t0 = time.perf_counter()
    m = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if read_all:
        with torch.no_grad():
            sum(float(p.sum()) for p in m.parameters())
    return time.perf_counter() - t0


def _export_peak(ckpt: Path, out: Path, shard_mb: int, queue: Any) -> None:
    """In a fresh process (no freed heap to reuse): the export's peak extra RSS."""
    from checkpoint.export import export_hf

    torch.set_num_threads(1)
    with PeakRSS() as mem:
        export_hf(ckpt, out, max_shard_mb=shard_mb)
    queue.put((mem.peak - mem.start) / 2**20)


def export_memory(ckpt: Path, out: Path, shard_mb: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_export_peak, args=(ckpt, out, shard_mb, queue))
    p.start()
    peak = queue.get(timeout=1800)
    p.join()
    shutil.rmtree(out, ignore_errors=True)
    return peak


METHODS = (
    "ours_import",
    "hf_import",
    "hf_import_read_all",
    "ours_export",
    "ours_export_no_verify",
    "hf_export",
)


def timings(hf_dir: Path, tmp: Path, a: argparse.Namespace) -> tuple[dict[str, list[float]], Path]:
    """Per method, ``a.repeats`` seconds (rotating order); and the Lattice checkpoint."""
    import transformers

    from checkpoint.export import export_hf

    torch.set_num_threads(1)
    model, family, _, _ = lattice_import(_overrides(hf_dir, tmp, "run1", []))
    ckpt = save_checkpoint(model, family, tmp / "ckpt")
    del model
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)

    def run(method: str, rep: int) -> float:
        if method == "ours_import":
            return lattice_import(_overrides(hf_dir, tmp, f"r{rep}", []))[2]
        if method.startswith("hf_import"):
            return _import_hf(hf_dir, method.endswith("read_all"))
        out = tmp / f"out-{method}-{rep}"
        t0 = time.perf_counter()
        if method == "hf_export":
            hf.save_pretrained(out, max_shard_size=f"{a.shard_mb}MB")
        else:
            export_hf(ckpt, out, max_shard_mb=a.shard_mb, verify=method == "ours_export")
        seconds = time.perf_counter() - t0
        shutil.rmtree(out)
        return seconds

    raw: dict[str, list[float]] = {m: [] for m in METHODS}
    for rep in range(a.repeats):
        k = rep % len(METHODS)
        for method in METHODS[k:] + METHODS[:k]:
            raw[method].append(run(method, rep))
        print(rep, {m: v[-1] for m, v in raw.items()}, flush=True)
    return raw, ckpt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--layout", nargs="*", default=["parallel.dp_shard=4"])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    load_before = _uptime()
    tmp = Path(tempfile.mkdtemp(prefix="hf-interop-", dir=os.environ.get("BENCH_DIR")))
    try:
        n = save_random_llama(tmp / "hf", a)
        from train.data import prepare_stdlib

        prepare_stdlib(tmp / "data", max_bytes=400_000, val_fraction=0.05)
        ranks = memory_on_ranks(_overrides(tmp / "hf", tmp, "mem", a.layout), a.ranks)
        for r in ranks:
            print("rank", r, flush=True)
        raw, ckpt = timings(tmp / "hf", tmp, a)
        export_peak = export_memory(ckpt, tmp / "out-mem", a.shard_mb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(n, a, ranks, raw, export_peak, (load_before, _uptime()))


def report(n: int, a: Any, ranks: list[dict], raw: dict, export_peak: float, load: tuple) -> None:
    load_before, load_after = load
    med = {k: median(v) for k, v in raw.items()}
    ratios = {
        "import_ours_over_hf": med["ours_import"] / med["hf_import"],
        "import_ours_over_hf_read_all": med["ours_import"] / med["hf_import_read_all"],
        "export_ours_over_hf": med["ours_export"] / med["hf_export"],
        "export_ours_no_verify_over_hf": med["ours_export_no_verify"] / med["hf_export"],
    }
    for r in ranks:
        r["bound_mb"] = r["share_mb"] + r["largest_tensor_mb"]
        r["within_bound"] = r["peak_extra_mb"] <= r["bound_mb"]
    table = [
        {
            "what": f"rank {r['rank']} import peak extra RSS MB",
            "value": r["peak_extra_mb"],
            "bound": f"share {r['share_mb']:.0f} + largest tensor {r['largest_tensor_mb']:.0f}",
            "holds": r["within_bound"],
        }
        for r in ranks
    ]
    table += [
        {"what": f"{k} s (median)", "value": v, "bound": "", "holds": ""}
        for k, v in med.items()
        if k != "ours_export_peak_extra_mb"
    ]
    table += [
        {
            "what": "ours export peak extra RSS MB (fresh process)",
            "value": export_peak,
            "bound": f"one output shard {a.shard_mb} MB + largest tensor",
            "holds": export_peak <= a.shard_mb + ranks[0]["largest_tensor_mb"],
        },
    ]
    table += [
        {"what": f"ratio {k}", "value": v, "bound": "", "holds": ""} for k, v in ratios.items()
    ]
    write_results(
        "hf_interop",
        {
            "params": n,
            "args": vars(a),
            "ranks": ranks,
            "raw": raw,
            "medians": med,
            "ratios": ratios,
            "uptime_before": load_before,
            "uptime_after": load_after,
        },
        table,
        notes=(
            f"Random LlamaForCausalLM, {n / 1e6:.0f}M params ({n * 4 / 2**30:.2f} GiB fp32), "
            f"dim {a.dim}, {a.layers} layers, vocab {a.vocab}, {a.shard_mb} MB shards. Memory: "
            f"{a.ranks} gloo ranks, layout {' '.join(a.layout)}, peak extra RSS = VmHWM after the "
            "import minus RSS before it (VmHWM reset via /proc/self/clear_refs). Speed: one "
            f"process, 1 intra-op thread, warm page cache, median of {a.repeats} repeats in "
            "rotating order. Shared, noisy machine: `uptime` before: "
            f"`{load_before}`; after: `{load_after}`."
        ),
    )


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
