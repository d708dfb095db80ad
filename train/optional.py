"""Optional NVIDIA packages (DALI, apex): detection and the one-line error when one is missing.

``plan_run`` calls ``check_optional_packages`` before any process group exists, so selecting
``data.backend=dali`` or ``optim.impl=apex_fused_adam`` without the package fails at once with
the package name and the install command, on every rank alike.

NVIDIA apex is detected by importing ``apex.optimizers.FusedAdam``: PyPI's ``apex`` is an
unrelated package that must never be taken for it (and is never a dependency here).
"""

from __future__ import annotations

import importlib
import importlib.util

from models.errors import MissingPackageError

DALI_PACKAGE = "nvidia-dali-cuda120==2.4.0"
DALI_INSTALL = 'pip install -e ".[dali]"'
APEX_INSTALL = (
    "build NVIDIA apex from source (https://github.com/NVIDIA/apex: pip install -v "
    '--no-build-isolation --config-settings "--build-option=--cpp_ext" '
    '--config-settings "--build-option=--cuda_ext" ./apex); PyPI\'s `apex` is a different package'
)
DATA_BACKENDS = ("torch", "dali")


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def apex_available() -> bool:
    """Whether NVIDIA apex (with its fused optimizers) imports."""
    try:
        if importlib.util.find_spec("apex") is None:
            return False
        return hasattr(importlib.import_module("apex.optimizers"), "FusedAdam")
    except Exception:  # PyPI's apex, a broken build, or no CUDA extension
        return False


def check_optional_packages(job: object) -> None:
    """Reject a config that selects a missing optional package (one line, names the fix)."""
    d = job.data
    if d.backend not in DATA_BACKENDS:
        raise MissingPackageError(
            f"data.backend={d.backend!r} is unknown: use one of {', '.join(DATA_BACKENDS)}"
        )
    for name in ("prefetch", "loader_threads"):
        if getattr(d, name) < 1:
            raise MissingPackageError(f"data.{name}={getattr(d, name)} must be >= 1")
    if d.dali_device not in ("cpu", "gpu"):
        raise MissingPackageError(f"data.dali_device={d.dali_device!r} is unknown: use cpu or gpu")
    if d.dali_device == "gpu" and d.backend != "dali":
        raise MissingPackageError(
            f"data.dali_device=gpu applies to data.backend=dali, not {d.backend!r}: set "
            "data.backend=dali or data.dali_device=cpu"
        )
    if d.backend == "dali" and not dali_available():
        raise MissingPackageError(
            f"data.backend=dali needs NVIDIA DALI ({DALI_PACKAGE}), which is not installed: "
            f"run `{DALI_INSTALL}` or set data.backend=torch"
        )
    if d.backend == "dali" and d.dali_device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise MissingPackageError(
                "data.dali_device=gpu needs a CUDA device and none is visible: set "
                "data.dali_device=cpu"
            )
    if job.optim.impl == "apex_fused_adam" and not apex_available():
        raise MissingPackageError(
            "optim.impl=apex_fused_adam needs NVIDIA apex (apex.optimizers.FusedAdam), which "
            f"does not import: {APEX_INSTALL}; or set optim.impl=auto"
        )
