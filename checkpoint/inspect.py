"""``python -m checkpoint.inspect <ckpt> [--json | --verify]``: print or verify a checkpoint.

Default: one line per tensor (logical name, logical shape, dtype, saved placements on mesh dims,
padding, number of chunks); then the train state summary and the manifest (file, bytes, sha256
prefix). ``--json`` prints the raw index.json.

``--verify`` checks the size and sha256 of every file of the manifest, and that the train state
and every chunk's file are listed in it. Each damaged file gets one line (unlisted, missing,
size against the manifest's, or sha256 mismatch); a last line names the newest earlier committed
step of the same checkpoints folder that verifies clean, as ``checkpoint.resume=<path>``.

Exit status: 0 printed / verified clean, 1 damaged files found, 2 bad usage or unreadable index.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from checkpoint.format import (
    CheckpointError,
    Damage,
    checkpoint_damage,
    newest_clean_before,
    read_index,
    referenced_files,
    resolve,
)


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


def resume_hint(ckpt: Path) -> str:
    """Where to resume from instead of a damaged ``ckpt``."""
    older = newest_clean_before(ckpt)
    if older is None:
        return f"no earlier committed step of {ckpt.parent} verifies clean"
    return f"the newest earlier step that verifies clean is {older}: checkpoint.resume={older}"


def damage_report(ckpt: Path, damage: list[Damage], checked: int) -> str:
    """One ``damaged:`` line per bad file, then a summary line with the resume hint."""
    lines = [f"damaged: {d.message}" for d in damage]
    lines.append(f"{ckpt}: {len(damage)} of {checked} files damaged; {resume_hint(ckpt)}")
    return "\n".join(lines)


def verify(ckpt: Path) -> tuple[str, int]:
    """The ``--verify`` report of ``ckpt`` and its exit status (0 clean, 1 damaged)."""
    index = read_index(ckpt)
    files = referenced_files(ckpt, index)
    damage = checkpoint_damage(ckpt, index)
    if damage:
        return damage_report(ckpt, damage, len(files)), 1
    nbytes = sum(index["manifest"][f]["bytes"] for f in files)
    return f"{ckpt}: verified {len(files)} files, {nbytes} bytes: ok", 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m checkpoint.inspect",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("ckpt", help="checkpoint folder (step_*) or a checkpoints/ folder (latest)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="print the raw index.json")
    mode.add_argument(
        "--verify", action="store_true", help="check every file's size and sha256 (exit 1 if bad)"
    )
    a = ap.parse_args(argv)
    ckpt = Path(a.ckpt)
    rc = 0
    try:
        if not (ckpt / "index.json").exists():
            ckpt = resolve(ckpt, "latest")
        if a.verify:
            out, rc = verify(ckpt)
        else:
            out = json.dumps(read_index(ckpt), indent=1) if a.json else describe(ckpt)
        print(out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
