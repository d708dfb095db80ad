"""Shared helpers for benchmarks: medians, result files (JSON + Markdown), machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_results(
    name: str, data: dict[str, Any], table: list[dict[str, Any]], notes: str = ""
) -> None:
    """Write ``benchmarks/results/<name>.json`` and a Markdown table ``<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {**data, "machine": machine()}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    cols = list(table[0]) if table else []
    lines = [f"# {name}", "", notes, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    m = data["machine"]
    lines += ["", f"Machine: {m['cpu_count']} CPUs, torch {m['torch']}, GPU: {m['gpu'] or 'none'}."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
