"""Quality check of ``model=gpt_moe`` against the dense model with the same active parameters.

Trains ``python -m train model=gpt_moe`` and ``python -m train`` (gpt_tiny, dense) on the
default corpus for the same number of steps and records both final val_loss values, the
difference, and the parameter counts in ``benchmarks/results/moe_quality.{json,md}``.

    python benchmarks/moe_quality.py                       # runs both (~2 x a few minutes CPU)
    python benchmarks/moe_quality.py --moe-run DIR --dense-run DIR   # reuse finished runs
    python benchmarks/moe_quality.py --steps 100          # fewer steps, the same for both
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _run(overrides: list[str], run_dir: Path) -> None:
    cmd = [sys.executable, "-m", "train", *overrides, f"run.dir={run_dir}"]
    cmd += ["logging.progress=false", "logging.plot=false"]
    subprocess.run(cmd, cwd=ROOT, check=True)


def _summary(run_dir: Path) -> dict:
    from train.metrics import read_metrics

    recs = read_metrics(run_dir / "metrics.jsonl")
    val = [r for r in recs if "val_loss" in r][-1]
    train = [r for r in recs if "loss" in r]
    return {"step": val["step"], "val_loss": val["val_loss"], "train_loss": train[-1]["loss"]}


def _active_params(name: str) -> dict:
    import torch

    from parallelism.dims import ParallelDims
    from train.cli import load_config
    from train.families import get_family

    job, _ = load_config([f"model={name}"])
    family = get_family(job.model)(job, ParallelDims(1), 0)
    with torch.device("meta"):
        model = family.model_cls(family.model_config())
    total = sum(p.numel() for p in model.parameters())
    active = total
    if name == "gpt_moe":
        cfg = model.cfg
        expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        active = total - expert + expert * cfg.top_k // cfg.n_experts
    return {"total": total, "active": active}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe-run", default="")
    ap.add_argument("--dense-run", default="")
    ap.add_argument("--steps", type=int, default=0, help="train.steps for both (0: default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "moe_quality"))
    a = ap.parse_args()
    moe_dir = Path(a.moe_run or ROOT / "runs" / "moe_quality_moe")
    dense_dir = Path(a.dense_run or ROOT / "runs" / "moe_quality_dense")
    common = [f"train.steps={a.steps}"] if a.steps else []
    if not a.moe_run:
        _run(["model=gpt_moe", *common], moe_dir)
    if not a.dense_run:
        _run(common, dense_dir)
    moe, dense = _summary(moe_dir), _summary(dense_dir)
    try:
        params = {"gpt_moe": _active_params("gpt_moe"), "gpt_tiny": _active_params("gpt_tiny")}
    except Exception as exc:  # parameter counts are informative only
        params = {"error": repr(exc)}
    res = {
        "gpt_moe": moe,
        "gpt_tiny_dense": dense,
        "val_loss_diff_moe_minus_dense": moe["val_loss"] - dense["val_loss"],
        "params": params,
        "steps": moe["step"],
        "criterion": "moe val_loss not worse than dense by more than 0.02 at the same step",
        "holds": moe["val_loss"] - dense["val_loss"] <= 0.02 and moe["step"] == dense["step"],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = [
        f"# gpt_moe vs dense gpt_tiny (same active parameters, {moe['step']} steps each, "
        "default corpus)",
        "",
        "| model | step | train loss | val_loss |",
        "| --- | ---: | ---: | ---: |",
        f"| gpt_moe (8 experts, top-2 SparseMixer-v2) | {moe['step']} | {moe['train_loss']:.4f} "
        f"| {moe['val_loss']:.4f} |",
        f"| gpt_tiny (dense) | {dense['step']} | {dense['train_loss']:.4f} "
        f"| {dense['val_loss']:.4f} |",
        "",
        f"val_loss difference (moe - dense): {res['val_loss_diff_moe_minus_dense']:+.4f} "
        f"(criterion <= +0.02: {'holds' if res['holds'] else 'does NOT hold'})",
        f"parameters: {json.dumps(params)}",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
