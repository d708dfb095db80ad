"""Metrics: ``metrics.jsonl`` (one JSON object per logged step), a rank-0 progress bar, optional
wandb (offline unless WANDB_MODE says otherwise) and ``loss.png`` at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Writes metrics on rank 0 only; other ranks get a no-op logger."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        progress: bool = True,
        wandb_project: str | None = None,
        config: dict | None = None,
        append: bool = False,
        unit: str = "tokens",
    ) -> None:
        self.enabled, self.unit = enabled, unit
        self.path = run_dir / "metrics.jsonl"
        # A fresh run starts a fresh file; a resumed run appends to its history.
        self._file = open(self.path, "a" if append else "w") if enabled else None  # noqa: SIM115
        self._bar = None
        self._wandb = None
        if enabled and progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5
            )
        if enabled and wandb_project:
            os.environ.setdefault("WANDB_MODE", "offline")
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(
                {k: v for k, v in record.items() if k != "step"}, step=record.get("step")
            )

    def progress(
        self, step: int, loss: float, items_per_s: float, record: dict[str, Any] | None = None
    ) -> None:
        """Progress bar: step, loss, throughput (tokens or samples per second) and, from the
        step's ``record``, model TFLOP/s per rank, MFU (when a peak is known) and peak memory."""
        if self._bar is not None:
            self._bar.n = step
            post = {f"{self.unit[:3]}_s": f"{items_per_s:,.0f}", **perf_postfix(record or {})}
            self._bar.set_postfix(loss=f"{loss:.4f}", **post, refresh=False)
            self._bar.refresh()

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def perf_postfix(record: dict[str, Any]) -> dict[str, str]:
    """``TFLOP/s``, ``MFU`` (percent) and ``mem`` (GiB) of a record, those it has."""
    out = {}
    if "tflops_per_rank" in record:
        out["TFLOP/s"] = f"{record['tflops_per_rank']:.3f}"
    if record.get("mfu") is not None:
        out["MFU"] = f"{100 * record['mfu']:.1f}%"
    if "peak_mem_gib" in record:
        out["mem"] = f"{record['peak_mem_gib']:.2f}GiB"
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out_png: Path) -> None:
    """Training loss (and validation loss where logged) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train")
    if va:
        ax.plot(*zip(*va), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
