"""What a model family tells the checkpoint about its tensors (torchtitan's StateDictAdapter).

``checkpoint/`` never imports a model: the family (``train/families/``) describes each tensor's
logical metadata here, and ``checkpoint.Manager`` records it in the index and applies it on load.

* ``logical_name``: a rank's parameter name -> the name in the unsharded model (a sharded
  recommender holds table ``t_f`` as ``local_ebc.embedding_bags.t_f.weight``; the plain model
  calls it ``sparse_arch.embedding_bag_collection.embedding_bags.t_f.weight``).
* ``padding``: ``{logical name: (dim, logical size)}`` for vocabulary padding (rows beyond the
  logical vocabulary are dropped on save and zero on load).
* ``experts``: logical names of stacked expert weights (dim 0 indexes the experts).
* ``tables``: logical names of embedding tables (recorded as such in the index).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def _identity(name: str) -> str:
    return name


@dataclass
class CheckpointAdapter:
    """Per-tensor logical metadata a family declares for the universal checkpoint."""

    logical_name: Callable[[str], str] = _identity
    """A rank's canonical parameter name -> the unsharded model's name."""
    padding: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Logical name -> (padded dim, logical size)."""
    experts: frozenset[str] = frozenset()
    """Logical names of stacked (E, ...) expert weights."""
    tables: frozenset[str] = frozenset()
    """Logical names of embedding tables."""

    def part(self, logical: str, ndim: int) -> dict:
        """The ``expert`` / ``table`` entries of a tensor's partitioning record."""
        out: dict = {}
        if logical in self.experts and ndim == 3:
            out["expert"] = {"dim": 0}
        if logical in self.tables:
            out["table"] = True
        return out
