"""The user-error classes of every Lattice package, in one leaf module.

Each is raised before any work is lost, with a one-line message that names the config field
(or the file) and the fix; ``python -m train`` prints it as ``[rank r] error: ...`` and exits 2.
This module imports nothing from the project, so any package may raise these without an upward
import: it lives in ``models/``, the bottom of the dependency graph (``train -> parallelism,
checkpoint, offload -> models``; ``tests/unit/test_import_graph.py`` enforces the directions).
"""

from __future__ import annotations


class LatticeUserError(Exception):
    """Base of every error that reports bad input (config, layout, data, checkpoint)."""


class ConfigError(LatticeUserError, ValueError):
    """A configuration error: one line, naming the field and the fix."""


class LayoutError(ConfigError):
    """A parallel layout that cannot run; the message names the field and the fix."""


class DataError(LatticeUserError, ValueError):
    """Missing or malformed data; the message names the path and the fix."""


class RecDataError(DataError):
    """Bad click-data input; the message names the field and the fix."""


class CheckpointError(LatticeUserError, RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names the file and the fix."""


class OffloadConfigError(LayoutError):
    """Bad offload configuration or unusable NVMe path; the message names the field and fix."""


class MissingPackageError(ConfigError):
    """An optional package a config selects is not installed (or a loader field is bad); the
    message names the field, the package and the install command."""
