"""Loader benchmark: samples/s of the torch and DALI backends next to the trainer's consumption.

    python -m benchmarks.loader          # writes benchmarks/results/loader.json and loader.md

One run. Both backends read the same memory-mapped stdlib shards with the default experiment's
shape (global batch 32, micro-batch 8, seq_len 128, seed 0, one data-parallel rank), with 1, 2
and 4 worker threads (DALI: ``data.loader_threads`` worker processes and CPU threads, prefetch
depth 2; torch: an in-process loader, so the count only sets ``torch.set_num_threads``). Each
cell is the median of ``REPEATS`` timings of ``BATCHES`` global batches after a warm-up batch
(pipeline built, workers started, page cache warm), with a consumer that does nothing: the rate
at which the loader can deliver. The trainer's consumption rate is measured in the same run:
``python -m train`` (default experiment) for ``TRAIN_STEPS`` steps, median ``tokens_per_s`` of
steps 2.. divided by seq_len. The ratio loader/consumption must be >= 5 for the loader not to
be the bottleneck. CPU only here (no GPU in this environment): no DALI GPU-pipeline figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import median, write_results
from train.data import TokenLoader, TokenShards, prepare_stdlib
from train.loaders import DaliTokenLoader

ROOT = Path(__file__).resolve().parents[1]
SEQ, GLOBAL, MICRO = 128, 32, 8
THREADS = (1, 2, 4)
REPEATS, BATCHES, TRAIN_STEPS = 5, 50, 25


def loader_rate(make, threads: int) -> list[float]:
    """samples/s of ``REPEATS`` timings of ``BATCHES`` global batches (after one warm-up)."""
    torch.set_num_threads(threads)
    ld = make(threads)
    ld.next_batch()
    rates = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(BATCHES):
            ld.next_batch()
        rates.append(BATCHES * GLOBAL / (time.perf_counter() - t0))
    if hasattr(ld, "close"):
        ld.close()
    return rates


def consumption_rate(data_dir: Path) -> tuple[float, list[float]]:
    """Samples/s the default experiment's trainer consumes (one process, this machine)."""
    with tempfile.TemporaryDirectory() as run_dir:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "train",
                f"train.steps={TRAIN_STEPS}",
                "train.eval_every=0",
                "train.eval_batches=1",
                "logging.every=1",
                "logging.progress=false",
                "logging.plot=false",
                f"data.path={data_dir}",
                f"run.dir={run_dir}",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
            capture_output=True,
        )
        recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r["step"] >= 2]
    per_step = [t / SEQ for t in tps]
    return median(per_step), per_step


def main() -> None:
    data_dir = prepare_stdlib(ROOT / "data_cache" / "stdlib", 16_000_000, 0.05)  # the default
    shards = TokenShards.open(data_dir, "train")
    consume, consume_all = consumption_rate(data_dir)
    torch_threads = torch.get_num_threads()
    rows, raw = [], {}
    for threads in THREADS:
        for backend, make in (
            ("torch", lambda n: TokenLoader(shards, SEQ, GLOBAL, MICRO, seed=0)),
            (
                "dali",
                lambda n: DaliTokenLoader(shards, SEQ, GLOBAL, MICRO, seed=0, threads=n),
            ),
        ):
            rates = loader_rate(make, threads)
            raw[f"{backend}/{threads}"] = rates
            rows.append(
                {
                    "backend": backend,
                    "threads": threads,
                    "samples_per_s": median(rates),
                    "x_consumption": median(rates) / consume,
                }
            )
    torch.set_num_threads(torch_threads)
    ok = all(r["x_consumption"] >= 5 for r in rows)
    data = {
        "shape": {"seq_len": SEQ, "global_batch": GLOBAL, "micro_batch": MICRO},
        "repeats": REPEATS,
        "batches_per_timing": BATCHES,
        "trainer_samples_per_s": consume,
        "trainer_samples_per_s_all_steps": consume_all,
        "rows": rows,
        "raw_samples_per_s": raw,
        "loader_at_least_5x_consumption": ok,
        "gpu": "none in this environment: no DALI GPU-pipeline throughput or step times",
    }
    notes = (
        f"Default experiment (gpt_tiny, global batch {GLOBAL}, seq {SEQ}) consumes "
        f"{consume:.1f} samples/s on this machine (median of {len(consume_all)} steps). "
        f"Loader rates are medians of {REPEATS} timings of {BATCHES} global batches; "
        f"x_consumption = loader / trainer. Loader >= 5x consumption everywhere: {ok}. "
        "No GPU here: DALI ran CPU pipelines only."
    )
    write_results("loader", data, rows, notes)
    print(json.dumps({"trainer_samples_per_s": consume, "rows": rows, "ok": ok}, indent=1))


if __name__ == "__main__":
    main()
