"""Checkpointing: universal format, lazy asynchronous engine, resharding loader.

``Manager`` (checkpoint/manager.py) is the trainer's entry point; the on-disk format lives in
checkpoint/format.py, the lazy snapshot engine in checkpoint/engine.py. See docs/checkpoint.md.
"""

from __future__ import annotations

from typing import Any

from checkpoint.format import CheckpointError
from checkpoint.manager import MODES, Manager


def validate_checkpoint_args(args: Any) -> None:
    """Reject bad ``checkpoint.*`` values before any process group exists."""
    if args.mode not in MODES:
        raise CheckpointError(
            f"checkpoint.mode={args.mode!r} is not one of {', '.join(MODES)}: "
            f"use checkpoint.mode=lazy_async (default)"
        )
    if args.every < 0:
        raise CheckpointError(f"checkpoint.every={args.every} must be >= 0 (0 = only at the end)")
    if getattr(args, "host_buffer_mb", 1) < 1:
        raise CheckpointError(
            f"checkpoint.host_buffer_mb={args.host_buffer_mb} must be >= 1 (MiB of host buffer)"
        )


__all__ = ["CheckpointError", "Manager", "validate_checkpoint_args"]
