"""``python -m checkpoint.inspect <ckpt> [--json]``: print a checkpoint's index.

One line per tensor: logical name, logical shape, dtype, saved placements on mesh dims, padding,
number of chunks; then the train state summary and the manifest (file, bytes, sha256 prefix).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from checkpoint.format import CheckpointError, read_index, resolve


def describe(ckpt: Path) -> str:
    index = read_index(ckpt)
    lines = [
        f"{ckpt}: step {index['step']}, world size {index['world_size']}, "
        f"layout {index.get('layout')}, {len(index['tensors'])} tensors"
    ]
    for name, t in index["tensors"].items():
        p = t["partitioning"]
        place = ",".join(
            f"{d}:{pl}" for d, pl in zip(p.get("mesh_dims", []), p.get("placements", []))
        )
        extra = "".join(f" {k}={p[k]}" for k in ("padding", "expert", "fused") if p.get(k))
        lines.append(
            f"  {name:48s} {t['logical_shape']!s:16s} {t['dtype']:9s} "
            f"[{place or 'plain'}] chunks={len(t['chunks'])}{extra}"
        )
    state = json.loads((ckpt / index["train_state"]).read_text())
    lines.append(f"train_state: step={state['step']} data={state.get('data')}")
    lines.append("manifest:")
    for f, m in index["manifest"].items():
        lines.append(f"  {f:36s} {m['bytes']:>12d} B  sha256 {m['sha256'][:16]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m checkpoint.inspect", description=__doc__)
    ap.add_argument("ckpt", help="checkpoint folder (step_*) or a checkpoints/ folder (latest)")
    ap.add_argument("--json", action="store_true", help="print the raw index.json")
    a = ap.parse_args(argv)
    ckpt = Path(a.ckpt)
    try:
        if not (ckpt / "index.json").exists():
            ckpt = resolve(ckpt, "latest")
        print(json.dumps(read_index(ckpt), indent=1) if a.json else describe(ckpt))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
