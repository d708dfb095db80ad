"""Optimizer-state offload (CPU / NVMe tiers, interleaved CPU/accelerator updates).

Entry points: ``build_offload_optimizer`` (from the config), ``InterleavedOptimizer``,
``calibrate``. See docs/offload.md.
"""

from offload.build import build_offload_optimizer, validate_offload_args
from offload.optimizer import InterleavedOptimizer
from offload.tiers import OffloadConfigError

__all__ = [
    "InterleavedOptimizer",
    "OffloadConfigError",
    "build_offload_optimizer",
    "validate_offload_args",
]
