"""Trainer overhead: steps/s of ``python -m train`` vs a minimal hand-written PyTorch loop.

Both run the default experiment's model, global batch (4 micro-batches of 8 x 128 tokens),
AdamW (fused), grad-norm clipping and LR schedule, single process, in fresh subprocesses with the
same thread settings, alternating ours/hand-written ``--repeats`` times. Throughput is measured
over whole loop iterations after a warm-up (everything the trainer does per step counts: data
loading, logging every 10 steps, the progress bar). Ratio = ours / hand-written; target >= 0.95.

    python benchmarks/overhead.py --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import median, write_results  # noqa: E402

WARMUP = 10

HAND = r"""
import sys, time, math, numpy as np, torch
from models.gpt import GPT, GPTConfig
from parallelism.init import materialize_and_init_
from train.data import prepare_stdlib
steps, warm = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
with torch.device("meta"):
    model = GPT(GPTConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2))
materialize_and_init_(model, 0)
tok = np.memmap(prepare_stdlib(__import__("pathlib").Path("data_cache/stdlib"), 16_000_000, 0.05) / "train.bin", dtype=np.uint16, mode="r")
decay = [p for p in model.parameters() if p.ndim >= 2]; rest = [p for p in model.parameters() if p.ndim < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95), fused=True)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
n = (len(tok) - 1) // 128
g = torch.Generator().manual_seed(0)
t0 = None
for step in range(steps):
    if step == warm: t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    idx = torch.randint(0, n, (32,), generator=g).numpy()
    seq = torch.from_numpy(np.stack([tok[i * 128 : i * 128 + 129] for i in idx]).astype(np.int64))
    for m in range(4):
        x, y = seq[m * 8 : m * 8 + 8, :-1], seq[m * 8 : m * 8 + 8, 1:]
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()) / 4
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); sched.step()
print((steps - warm) / (time.perf_counter() - t0))
"""


def run_ours(steps: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "train",
                f"train.steps={steps}",
                "train.eval_every=0",
                "train.eval_batches=1",
                "logging.plot=false",
                f"run.dir={d}",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        recs = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "elapsed_s" in r]
        a = next(r for r in recs if r["step"] >= WARMUP)
        b = recs[-1]
        return (b["step"] - a["step"]) / (b["elapsed_s"] - a["elapsed_s"])


def run_hand(steps: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", HAND, str(steps), str(WARMUP)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ours, hand = [], []
    t = time.time()
    for _ in range(args.repeats):
        ours.append(run_ours(args.steps))
        hand.append(run_hand(args.steps))
        print(f"ours {ours[-1]:.3f} steps/s  hand-written {hand[-1]:.3f} steps/s", flush=True)
    ratio = median(ours) / median(hand)
    data = {
        "steps": args.steps,
        "warmup": WARMUP,
        "repeats": args.repeats,
        "ours_steps_per_s": ours,
        "hand_steps_per_s": hand,
        "median_ours": median(ours),
        "median_hand": median(hand),
        "ratio": ratio,
        "target": ">= 0.95",
        "wall_s": time.time() - t,
    }
    write_results(
        "overhead",
        data,
        [
            {
                "loop": "python -m train",
                "median steps/s": median(ours),
                "runs": ", ".join(f"{x:.3f}" for x in ours),
            },
            {
                "loop": "hand-written PyTorch",
                "median steps/s": median(hand),
                "runs": ", ".join(f"{x:.3f}" for x in hand),
            },
            {"loop": "ratio (ours / hand)", "median steps/s": ratio, "runs": ""},
        ],
        notes="Default experiment model and batch, single process, CPU. " + __doc__.splitlines()[0],
    )
    print(f"ratio ours/hand = {ratio:.3f}")


if __name__ == "__main__":
    main()
