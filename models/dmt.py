"""Disaggregated Multi-Tower model (DMT; Luo et al., "Disaggregated Multi-Tower: Topology-aware
Modeling Technique for Efficient Large-Scale Recommendation", MLSys 2024), as a plain module.

The sparse features are split into towers (a ``TowerPlan``: lists of feature names, e.g. from
``models/partitioner.py``). Each tower owns the tables of its features (a TorchRec
``EmbeddingBagCollection``) and a ``TowerModule`` that interacts and compresses the tower's
pooled embeddings [B, n_t, D] into ``k_t`` embeddings [B, k_t, D]. A global interaction over the
dense embedding and all tower outputs, then an over arch, give the click logit. With
``tower_out=0`` the tower module is the identity (the model is "SPTT only": the tower transform
without compression).

The forward is split into ``lookup`` (embeddings per tower), ``compress`` (tower modules) and
``head`` (global interaction + over arch) so that ``parallelism/dmt.py`` can run the first two on
the tower's host and the last on every rank, with the same parameters and the same math.
No process groups here.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.models.dlrm import DenseArch, OverArch

from models.dlrm import init_recsys_tensor, pairwise_dots, table_configs


class TowerModule(nn.Module):
    """Interacts a tower's features and compresses them (DMT's "tower module").

    out = Linear([flatten(x), pairwise_dots(x)]) reshaped to [B, k, D].

    Args:
        num_features: n, features in the tower.
        dim: D.
        num_out: k, output embeddings (k < n compresses what crosses hosts by n/k).
    """

    def __init__(self, num_features: int, dim: int, num_out: int) -> None:
        super().__init__()
        self.dim, self.num_out = dim, num_out
        n_in = num_features * dim + num_features * (num_features - 1) // 2
        self.proj = nn.Linear(n_in, num_out * dim)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        """[B, n, D] -> [B, k, D]."""
        z = torch.cat([x_BND.flatten(1), pairwise_dots(x_BND)], dim=1)
        return self.proj(z).view(-1, self.num_out, self.dim)


class Tower(nn.Module):
    """One tower: the tables of its features and its tower module (identity when k=0)."""

    def __init__(self, names: list[str], dim: int, num_embeddings: int, num_out: int) -> None:
        super().__init__()
        self.names, self.dim = list(names), dim
        self.ebc = EmbeddingBagCollection(
            tables=table_configs(self.names, dim, num_embeddings),
            device=torch.get_default_device(),
        )
        # "tm", not "module": parallelism/init.canonical_name strips "module." from names
        self.tm = TowerModule(len(names), dim, num_out) if num_out > 0 else nn.Identity()

    @property
    def num_out(self) -> int:
        return len(self.names) if isinstance(self.tm, nn.Identity) else self.tm.num_out

    def embed(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled embeddings of this tower's features (other keys ignored): [B, n_t, D]."""
        kt = self.ebc(sparse).to_dict()
        return torch.stack([kt[n] for n in self.names], dim=1)


class DMT(nn.Module):
    """Multi-tower DLRM.

    Args:
        num_dense: dense input features.
        towers: feature names per tower (every feature in exactly one tower).
        dim: embedding dimension D.
        num_embeddings: rows per table.
        tower_out: k_t, embeddings out of every tower module (0: no tower module).
        dense_layers: hidden sizes of the dense arch (D is appended).
        over_layers: hidden sizes of the over arch (1 is appended).
        emb_std: embedding initialisation standard deviation.

    Example::

        model = DMT(4, [["f0", "f2"], ["f1", "f3"]], dim=16, num_embeddings=32, tower_out=1)
        logits_B = model(dense_BDn, kjt)
    """

    def __init__(
        self,
        num_dense: int,
        towers: list[list[str]],
        dim: int,
        num_embeddings: int,
        tower_out: int = 1,
        dense_layers: tuple[int, ...] = (32,),
        over_layers: tuple[int, ...] = (64, 32),
        emb_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.dim, self.emb_std = dim, emb_std
        self.towers = nn.ModuleDict(
            {str(t): Tower(names, dim, num_embeddings, tower_out) for t, names in enumerate(towers)}
        )
        self.dense_arch = DenseArch(num_dense, [*dense_layers, dim])
        k = sum(t.num_out for t in self.towers.values())
        n_inter = dim + k * dim + (k + 1) * k // 2
        self.over_arch = OverArch(n_inter, [*over_layers, 1])

    def lookup(self, sparse: KeyedJaggedTensor) -> list[torch.Tensor]:
        """Pooled embeddings per tower: list of [B, n_t, D]."""
        return [t.embed(sparse) for t in self.towers.values()]

    def compress(self, emb: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tower modules: list of [B, n_t, D] -> list of [B, k_t, D]."""
        return [t.tm(e) for t, e in zip(self.towers.values(), emb)]

    def head(self, dense_BDn: torch.Tensor, tower_out: list[torch.Tensor]) -> torch.Tensor:
        """Global interaction + over arch: [B, Dn], list of [B, k_t, D] -> logits [B]."""
        d_BD = self.dense_arch(dense_BDn)
        t_BKD = torch.cat(tower_out, dim=1)
        x_BND = torch.cat([d_BD.unsqueeze(1), t_BKD], dim=1)
        z = torch.cat([d_BD, t_BKD.flatten(1), pairwise_dots(x_BND)], dim=1)
        return self.over_arch(z).squeeze(-1)

    def forward(self, dense_BDn: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """dense [B, num_dense], sparse KJT (batch B) -> click logits [B]."""
        return self.head(dense_BDn, self.compress(self.lookup(sparse)))

    def init_tensor(self, name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return init_recsys_tensor(name, shape, gen, self.emb_std)
