"""DLRM baseline (Naumov et al., 2019) built from TorchRec's named parts.

``SparseArch`` (an ``EmbeddingBagCollection`` over one table per sparse feature), ``DenseArch``
(MLP on dense features), ``InteractionArch`` (pairwise dot products) and ``OverArch`` (MLP to one
logit) are TorchRec's own modules (``torchrec.models.dlrm``); this file only wires them from our
config, gives every table a canonical name (``t_<feature>``) and provides ``init_tensor`` so the
weights are the same whatever the layout (see ``parallelism/init.py``). A plain module: no
process groups.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DenseArch, OverArch, SparseArch
from torchrec.models.dlrm import InteractionArch as _TorchRecInteractionArch


def feature_names(n: int) -> list[str]:
    """Canonical sparse feature names ``f0 .. f{n-1}`` (the data loaders name theirs so)."""
    return [f"f{i}" for i in range(n)]


def table_configs(names: list[str], dim: int, num_embeddings: int) -> list[EmbeddingBagConfig]:
    """One sum-pooled table ``t_<feature>`` per feature."""
    return [
        EmbeddingBagConfig(
            name=f"t_{n}", embedding_dim=dim, num_embeddings=num_embeddings, feature_names=[n]
        )
        for n in names
    ]


def init_recsys_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator, emb_std: float
) -> torch.Tensor:
    """Seeded initial value of a recommender parameter, by canonical name.

    Embedding tables: N(0, emb_std^2). Linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as
    torch's default. Biases: zero.
    """
    if "embedding_bags" in name:
        return torch.randn(shape, generator=gen) * emb_std
    if name.endswith("bias"):
        return torch.zeros(shape)
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def pairwise_dots(x_BND: torch.Tensor) -> torch.Tensor:
    """Upper-triangular pairwise dot products: [B, N, D] -> [B, N(N-1)/2]."""
    n = x_BND.shape[1]
    i, j = torch.triu_indices(n, n, offset=1, device=x_BND.device)
    return torch.bmm(x_BND, x_BND.transpose(1, 2))[:, i, j]


class InteractionArch(_TorchRecInteractionArch):
    """TorchRec's dot interaction (same output: [dense, upper-triangular dots of [dense,
    sparse]]) with its index buffer dropped: the buffer is non-persistent, so after a meta-device
    build and ``to_empty`` it would hold garbage; the indices are recomputed per call instead."""

    def __init__(self, num_sparse_features: int) -> None:
        super().__init__(num_sparse_features)
        del self._buffers["triu_indices"]

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor) -> torch.Tensor:
        """dense [B, D], sparse [B, F, D] -> [B, D + (F+1)F/2]."""
        x = torch.cat([dense_features.unsqueeze(1), sparse_features], dim=1)
        return torch.cat([dense_features, pairwise_dots(x)], dim=1)


class DLRM(nn.Module):
    """Flat DLRM: every feature's pooled embedding interacts with every other.

    Args:
        num_dense: dense input features.
        num_sparse: sparse features (one table each, named ``f0..``).
        dim: embedding dimension D (also the dense arch's output size).
        num_embeddings: rows per table.
        dense_layers: hidden sizes of the dense arch (D is appended).
        over_layers: hidden sizes of the over arch (1 is appended).
        emb_std: standard deviation of the embedding initialisation.

    Example::

        model = DLRM(num_dense=4, num_sparse=8, dim=16, num_embeddings=32)
        logits_B = model(dense_BDn, kjt)
    """

    def __init__(
        self,
        num_dense: int,
        num_sparse: int,
        dim: int,
        num_embeddings: int,
        dense_layers: tuple[int, ...] = (32,),
        over_layers: tuple[int, ...] = (64, 32),
        emb_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.names = feature_names(num_sparse)
        self.dim, self.emb_std = dim, emb_std
        self.sparse_arch = SparseArch(
            EmbeddingBagCollection(
                tables=table_configs(self.names, dim, num_embeddings),
                device=torch.get_default_device(),
            )
        )
        self.dense_arch = DenseArch(num_dense, [*dense_layers, dim])
        self.inter_arch = InteractionArch(num_sparse)
        n_inter = dim + (num_sparse + 1) * num_sparse // 2
        self.over_arch = OverArch(n_inter, [*over_layers, 1])

    def head(self, dense_BDn: torch.Tensor, emb_BFD: torch.Tensor) -> torch.Tensor:
        """Everything after the embedding lookup: [B, Dn], [B, F, D] -> logits [B]."""
        x = self.inter_arch(self.dense_arch(dense_BDn), emb_BFD)
        return self.over_arch(x).squeeze(-1)

    def forward(self, dense_BDn: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """dense [B, num_dense], sparse KJT (batch B) -> click logits [B]."""
        return self.head(dense_BDn, self.sparse_arch(sparse))

    def init_tensor(self, name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return init_recsys_tensor(name, shape, gen, self.emb_std)
