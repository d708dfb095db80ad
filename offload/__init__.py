"""Optimizer-state offload (CPU / NVMe tiers, interleaved CPU/accelerator updates).

Entry points: ``build_offload_optimizer`` (from the config), ``interleaved_optimizer`` (from
keywords), ``plan_offload`` and ``InterleavedOptimizer`` (a plan, then the optimizer that runs
it), ``offload.calibrate.calibrate``. See docs/offload.md.
"""

from offload.build import build_offload_optimizer, interleaved_optimizer, validate_offload_args
from offload.optimizer import InterleavedOptimizer
from offload.plan import OffloadPlan, OffloadSettings, plan_offload
from offload.tiers import OffloadConfigError

__all__ = [
    "InterleavedOptimizer",
    "OffloadConfigError",
    "OffloadPlan",
    "OffloadSettings",
    "build_offload_optimizer",
    "interleaved_optimizer",
    "plan_offload",
    "validate_offload_args",
]
