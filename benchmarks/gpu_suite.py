"""``make gpu-check``: every GPU path of Lattice in one run of at most 8 minutes on one GPU.

Steps (each a subprocess with its own time budget; their sum is under 8 minutes):

1. ``gpu_tests``: ``pytest -m gpu tests/gpu`` (DALI GPU outputs, offload placements on CUDA).
2. ``default_experiment``: the trainer on a ~150M-parameter Llama-style model (dim 1024, 12
   layers) in bf16 on the byte corpus; its ``metrics.jsonl`` gives tokens/s, TFLOP/s, MFU (the
   peak from the GPU table) and peak memory.
3. ``checkpoint_stall``: ``benchmarks/checkpoint.py --device cuda``: Lattice's lazy snapshot
   (a device-to-host copy) against ``torch.save`` and DCP ``async_save`` in one run (the
   issue-9 target: at most 5% of ``torch.save``'s stall).
4. ``offload``: ``benchmarks/offload_gpu.py``: interleaved placement against all-CPU offload.
5. ``moe_grouped_gemm``: ``benchmarks/moe.py --device cuda`` (``torch._grouped_mm`` block).
6. ``dali_loader``: the trainer with ``data.backend=dali data.dali_device=gpu`` (tokens/s).

Writes ``<out>/gpu_suite.md`` and ``.json`` (default ``benchmarks/results``) with each step's
status, seconds and the tail of its output; the benchmarks write their own ``gpu_*`` results.
Without a GPU every step reports ``skipped: no GPU`` (the dry run ``tests/unit/test_gpu_suite.py``
checks). Written here because the steps are separate programs with their own outputs; a
driver keeps the one time budget and one report.

    python -m benchmarks.gpu_suite [--out DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    argv: list[str]
    timeout_s: int


def _train(run_dir: str, *extra: str) -> list[str]:
    model = ["model.dim=1024", "model.n_layers=12", "model.n_heads=16", "model.n_kv_heads=16"]
    model += ["model.max_seq_len=1024"]
    loop = ["train.seq_len=1024", "train.global_batch_size=16", "train.micro_batch_size=16"]
    loop += [
        "train.dtype=bf16",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.warmup_steps=10",
    ]
    log = ["logging.every=10", "logging.plot=false", f"run.dir={run_dir}"]
    return [sys.executable, "-m", "train", *model, *loop, *log, *extra]


def steps(work: str) -> list[Step]:
    py = sys.executable
    return [
        Step(
            "gpu_tests",
            "pytest -m gpu tests/gpu",
            [py, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu"],
            90,
        ),
        Step(
            "default_experiment",
            "~150M GPT, bf16, 150 steps: tokens/s, TFLOP/s, MFU, peak memory",
            _train(f"{work}/default", "train.steps=150"),
            120,
        ),
        Step(
            "checkpoint_stall",
            "lazy_async vs torch.save vs DCP async_save stall, on CUDA",
            [
                py,
                "-m",
                "benchmarks.checkpoint",
                "--device",
                "cuda",
                "--repeats",
                "5",
                "--name",
                "gpu_checkpoint",
            ],
            90,
        ),
        Step(
            "offload",
            "interleaved vs all-CPU offload iteration time",
            [py, "-m", "benchmarks.offload_gpu", "--rounds", "2"],
            75,
        ),
        Step(
            "moe_grouped_gemm",
            "grouped-GEMM MoE block vs per-expert loop, on CUDA",
            [
                py,
                "-m",
                "benchmarks.moe",
                "--device",
                "cuda",
                "--tokens",
                "8192",
                "--dim",
                "1024",
                "--hidden",
                "1408",
                "--out",
                str(ROOT / "benchmarks" / "results" / "gpu_moe"),
            ],
            45,
        ),
        Step(
            "dali_loader",
            "the trainer fed by DALI with GPU outputs",
            _train(f"{work}/dali", "train.steps=40", "data.backend=dali", "data.dali_device=gpu"),
            60,
        ),
    ]


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def run_step(step: Step) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            step.argv, cwd=ROOT, capture_output=True, text=True, timeout=step.timeout_s
        )
        status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        tail = (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired as exc:
        status = f"failed (over its {step.timeout_s} s budget)"
        tail = str(exc.stdout or "")[-1500:]
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1), "tail": tail}


def training_summary(run_dir: Path) -> dict:
    """The last logged record's throughput fields of a trainer run."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if '"tokens_per_s"' in line]
    keys = ("step", "tokens_per_s", "tflops_per_rank", "mfu", "peak_mem_gib", "loss")
    return {k: recs[-1][k] for k in keys if recs and k in recs[-1]}


def run_suite(out: Path, dry_run: bool = False) -> list[dict]:
    """Run (or, without a GPU, skip) every step; write ``gpu_suite.md``/``.json`` to ``out``."""
    gpu = has_gpu() and not dry_run
    work = tempfile.mkdtemp(prefix="gpu-suite-")
    rows = []
    for step in steps(work):
        row = {"step": step.name, "what": step.what, "budget_s": step.timeout_s}
        row.update(run_step(step) if gpu else {"status": "skipped: no GPU", "seconds": 0.0})
        if gpu and step.name in ("default_experiment", "dali_loader"):
            row["metrics"] = training_summary(Path(work) / step.name.split("_")[0])
        rows.append(row)
        print(f"{step.name}: {row['status']} ({row['seconds']} s)", flush=True)
    write_report(out, rows, gpu)
    return rows


def write_report(out: Path, rows: list[dict], gpu: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    device = "none"
    if gpu:
        import torch

        device = torch.cuda.get_device_name(0)
    (out / "gpu_suite.json").write_text(json.dumps({"gpu": device, "steps": rows}, indent=2))
    lines = [
        "# GPU suite (`make gpu-check`)",
        "",
        f"GPU: {device}. Budget {BUDGET_S} s in all; each step has its own budget.",
        "",
        "| step | what | status | seconds | budget s | metrics |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        metrics = ", ".join(f"{k}={v}" for k, v in r.get("metrics", {}).items())
        lines.append(
            f"| {r['step']} | {r['what']} | {r['status']} | {r['seconds']} | {r['budget_s']} "
            f"| {metrics} |"
        )
    for r in rows:
        if r.get("tail"):
            lines += ["", f"## {r['step']}", "", "```", r["tail"].strip(), "```"]
    (out / "gpu_suite.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--dry-run", action="store_true", help="skip every step (as without a GPU)")
    a = ap.parse_args()
    rows = run_suite(Path(a.out), a.dry_run)
    return 0 if all(r["status"] in ("passed", "skipped: no GPU") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
