"""Write memory-mapped token shards (``train.bin``, ``val.bin``, ``meta.json``) from text files.

    python -m train.prepare --out data/mycorpus path/to/texts/ more.txt --suffix .txt --suffix .md

Tokenisation is byte-level (vocabulary 256, uint16 on disk). Files are split into train and
validation by a hash of their relative path, so adding files never reshuffles the split.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from train.data import DataError, collect_text_files, split_bytes, write_shards


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m train.prepare", description=__doc__.splitlines()[0]
    )
    ap.add_argument("inputs", nargs="+", type=Path, help="text files or folders")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument(
        "--suffix",
        action="append",
        default=None,
        help="file suffixes to read from folders (default .txt .py .md)",
    )
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--max-bytes", type=int, default=0, help="cap on bytes read (0 = all)")
    args = ap.parse_args(argv)
    try:
        files = collect_text_files(args.inputs, tuple(args.suffix or (".txt", ".py", ".md")))
        # Split by paths relative to the inputs, so the split does not depend on where they live.
        dirs = [str(p.resolve() if p.is_dir() else p.resolve().parent) for p in args.inputs]
        root = Path(os.path.commonpath(dirs))
        train, val = split_bytes(
            [f.resolve() for f in files], root, args.val_fraction, args.max_bytes
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_shards(args.out, train, val, 256, ",".join(map(str, args.inputs)))
    print(
        f"wrote {args.out}: {train.size:,} train and {val.size:,} val tokens from {len(files)} files"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
