"""``python -m checkpoint.export <ckpt> <out.safetensors> [--all]``: one consolidated file.

Writes the model's logical tensors (canonical names, vocabulary padding removed) to a single
safetensors file for inference and other tools; ``--all`` also writes optimizer state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from checkpoint.consolidate import load_consolidated
from checkpoint.format import CheckpointError, resolve


def export(ckpt: Path | str, out: Path | str, include_optimizer: bool = False) -> int:
    """Write the consolidated tensors of ``ckpt`` to ``out``; returns the number of tensors."""
    ckpt = Path(ckpt)
    if ckpt.name == "checkpoints" or (ckpt / "latest").exists():
        ckpt = resolve(ckpt, "latest")
    tensors = load_consolidated(ckpt, None if include_optimizer else "model/")
    named = {
        (k.removeprefix("model/") if not include_optimizer else k): v.contiguous()
        for k, v in tensors.items()
    }
    save_file(named, str(out), metadata={"source": str(ckpt)})
    return len(named)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m checkpoint.export", description=__doc__)
    ap.add_argument("ckpt", help="checkpoint folder (step_*) or a checkpoints/ folder (latest)")
    ap.add_argument("out", help="output .safetensors path")
    ap.add_argument("--all", action="store_true", help="include optimizer state")
    a = ap.parse_args(argv)
    try:
        n = export(a.ckpt, a.out, a.all)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
