"""The ``dlrm`` family: a flat DLRM on click data (``models/dlrm.py``); under torchrun every
table lives on one rank of the world (TorchRec's table-wise sharding, ``parallelism/dmt.py``)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from train.config import ModelArgs
from train.families.recsys import DLRMArgs, RecsysFamily, plain_dlrm


class DLRMFamily(RecsysFamily):
    name: ClassVar[str] = "dlrm"
    args: ClassVar[type[ModelArgs]] = DLRMArgs

    def build_plain(self) -> nn.Module:
        return plain_dlrm(self.job, self.click_data())

    def shard(self, plain: nn.Module, topo: Any, groups: Any, comm: Any) -> nn.Module:
        from parallelism.dmt import ShardedDLRM

        return ShardedDLRM(plain, topo, groups, comm, self.rank)
