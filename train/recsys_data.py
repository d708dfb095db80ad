"""Click data for the recommender path: a synthetic dataset with planted feature interactions
and a Criteo-format TSV loader.

Synthetic clicks (``SyntheticClicks``): ``num_sparse`` categorical features, each with
``cardinality`` ids, are split into ``num_groups`` planted groups (a seeded permutation, so a
group is not simply a run of consecutive features). Every feature ``f`` owns latent vectors
``u_f[id]`` in R^rank; the click logit is

    logit = bias + scale * sum_g sum_{i<j in group g} <u_i[x_i], u_j[x_j]> + w . dense

and ``label ~ Bernoulli(sigmoid(logit))``. Features only interact inside their group, which is
what the tower partitioner must recover. Because the true click probability of every sample is
known, the best achievable (Bayes) AUC of a split is the AUC of that probability against the
sampled labels (``best_auc``). Batch ``k`` of a split is generated from a generator seeded by
(seed, split, k) alone, so data are identical whatever the number of ranks: rank ``r`` of ``n``
takes rows ``[r*B/n, (r+1)*B/n)`` of the global batch.

Criteo TSV (``CriteoTSV``): one sample a line, ``label<TAB>13 integer dense<TAB>26 hex
categorical``; empty fields are missing. Dense values become ``log(1 + max(x, 0))``; a
categorical id is ``int(hex, 16) % num_embeddings`` and a missing one is an empty bag (length 0),
which is why batches carry a KeyedJaggedTensor and not a dense id matrix.

Follows the data conventions of TorchRec's DLRM example (``torchrec.datasets.criteo``), without
its dependency on torchdata/iopath.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torchrec import KeyedJaggedTensor

from models.dlrm import feature_names
from models.errors import RecDataError

CRITEO_DENSE = 13
CRITEO_SPARSE = 26


@dataclass
class RecBatch:
    """One batch of click samples.

    Attributes:
        dense: [B, num_dense] fp32 dense features.
        sparse: KeyedJaggedTensor with one key per sparse feature, batch size B.
        labels: [B] fp32 click labels in {0, 1}.
        prob: [B] true click probability (synthetic data only, else None).
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    prob: torch.Tensor | None = None

    def slice(self, start: int, stop: int) -> RecBatch:
        """Rows ``[start, stop)`` of the batch (a data-parallel rank's share)."""
        b = self.labels.shape[0]
        lengths = self.sparse.lengths().view(len(self.sparse.keys()), b)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.flatten().cumsum(0)])
        values, new_lengths = [], []
        for k in range(lengths.shape[0]):
            lo, hi = offsets[k * b + start], offsets[k * b + stop]
            values.append(self.sparse.values()[lo:hi])
            new_lengths.append(lengths[k, start:stop])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.sparse.keys(), values=torch.cat(values), lengths=torch.cat(new_lengths)
        )
        prob = None if self.prob is None else self.prob[start:stop]
        return RecBatch(self.dense[start:stop], kjt, self.labels[start:stop], prob)


def ids_to_kjt(ids_BF: torch.Tensor, names: list[str]) -> KeyedJaggedTensor:
    """One id per feature and sample -> KJT (key-major: all samples of f0, then f1, ...).

    Args:
        ids_BF: [B, F] int64 ids.
        names: F feature names.
    """
    b, f = ids_BF.shape
    return KeyedJaggedTensor.from_lengths_sync(
        keys=names,
        values=ids_BF.t().contiguous().flatten(),
        lengths=torch.ones(f * b, dtype=torch.long),
    )


class SyntheticClicks:
    """Deterministic click data with planted interaction groups (see module docstring)."""

    SPLITS = {"train": 0, "val": 1}

    def __init__(
        self,
        num_sparse: int = 16,
        num_groups: int = 4,
        cardinality: int = 32,
        num_dense: int = 4,
        rank: int = 4,
        logit_std: float = 2.5,
        seed: int = 0,
    ) -> None:
        if num_sparse % num_groups:
            raise RecDataError(
                f"data.num_sparse={num_sparse} is not divisible by data.num_groups={num_groups}: "
                "planted groups have equal size"
            )
        self.num_sparse, self.num_groups = num_sparse, num_groups
        self.cardinality, self.num_dense, self.seed = cardinality, num_dense, seed
        self.names = feature_names(num_sparse)
        g = torch.Generator().manual_seed(seed * 7919 + 17)
        perm = torch.randperm(num_sparse, generator=g)
        self.groups: list[list[int]] = [
            sorted(perm[i::num_groups].tolist()) for i in range(num_groups)
        ]
        self.group_of = torch.empty(num_sparse, dtype=torch.long)
        for gi, members in enumerate(self.groups):
            self.group_of[members] = gi
        self.latent = torch.randn(num_sparse, cardinality, rank, generator=g)
        self.w_dense = torch.randn(num_dense, generator=g) * 0.5
        size = num_sparse // num_groups
        n_pairs = num_groups * size * (size - 1) // 2
        self.scale = logit_std / math.sqrt(max(1, n_pairs) * rank)
        self.bias = -0.5

    def true_logit(self, dense: torch.Tensor, ids_BF: torch.Tensor) -> torch.Tensor:
        """The generating model's logit. dense [B, Dn], ids [B, F] -> [B]."""
        u = self.latent[torch.arange(self.num_sparse), ids_BF]  # [B, F, r]
        logit = torch.full((ids_BF.shape[0],), self.bias) + dense @ self.w_dense
        for members in self.groups:
            s = u[:, members]  # [B, n, r]
            # sum_{i<j} <s_i, s_j> = (|sum s|^2 - sum |s_i|^2) / 2
            pair = (s.sum(1).pow(2).sum(-1) - s.pow(2).sum((1, 2))) / 2
            logit = logit + self.scale * pair
        return logit

    def batch(self, split: str, index: int, batch_size: int) -> RecBatch:
        """Global batch ``index`` of ``split``; depends only on (seed, split, index, size)."""
        key = zlib.crc32(f"{self.seed}/{split}/{index}/{batch_size}".encode())
        g = torch.Generator().manual_seed(key)
        dense = torch.randn(batch_size, self.num_dense, generator=g)
        ids = torch.randint(0, self.cardinality, (batch_size, self.num_sparse), generator=g)
        prob = torch.sigmoid(self.true_logit(dense, ids))
        labels = torch.bernoulli(prob, generator=g)
        return RecBatch(dense, ids_to_kjt(ids, self.names), labels, prob)

    def best_auc(self, batches: int, batch_size: int, split: str = "val") -> float:
        """Bayes-optimal AUC on the first ``batches`` batches of ``split``."""
        from train.recsys_metrics import auc

        bs = [self.batch(split, i, batch_size) for i in range(batches)]
        return auc(torch.cat([b.prob for b in bs]), torch.cat([b.labels for b in bs]))


def _parse_criteo_line(line: str, num_embeddings: int) -> tuple[float, list[float], list[int]]:
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 1 + CRITEO_DENSE + CRITEO_SPARSE:
        raise RecDataError(
            f"Criteo line has {len(parts)} tab-separated fields, expected "
            f"{1 + CRITEO_DENSE + CRITEO_SPARSE} (label, 13 dense, 26 categorical)"
        )
    label = float(parts[0])
    dense = [math.log1p(max(float(x), 0.0)) if x else 0.0 for x in parts[1 : 1 + CRITEO_DENSE]]
    cats = [int(x, 16) % num_embeddings if x else -1 for x in parts[1 + CRITEO_DENSE :]]
    return label, dense, cats


class CriteoTSV:
    """A Criteo-format TSV file held in memory, served as ``RecBatch``es.

    The last ``val_fraction`` of the lines is the held-out split. Missing categorical values are
    empty bags.
    """

    def __init__(self, path: str | Path, num_embeddings: int, val_fraction: float = 0.1) -> None:
        path = Path(path)
        if not path.is_file():
            raise RecDataError(f"data.path={str(path)!r} is not a file: point it at a Criteo TSV")
        rows = [_parse_criteo_line(ln, num_embeddings) for ln in path.open() if ln.strip()]
        if not rows:
            raise RecDataError(f"data.path={str(path)!r} holds no samples")
        self.names = feature_names(CRITEO_SPARSE)
        self.num_dense, self.num_sparse = CRITEO_DENSE, CRITEO_SPARSE
        self.labels = torch.tensor([r[0] for r in rows])
        self.dense = torch.tensor([r[1] for r in rows])
        self.cats = torch.tensor([r[2] for r in rows], dtype=torch.long)  # [N, 26], -1 missing
        n_val = max(1, int(len(rows) * val_fraction))
        self.split_rows = {"train": (0, len(rows) - n_val), "val": (len(rows) - n_val, len(rows))}

    def batch(self, split: str, index: int, batch_size: int) -> RecBatch:
        """Global batch ``index`` of ``split``, wrapping around the split."""
        lo, hi = self.split_rows[split]
        rows = lo + (torch.arange(index * batch_size, (index + 1) * batch_size) % (hi - lo))
        cats = self.cats[rows]  # [B, F]
        present = cats >= 0
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.names,
            values=cats.t()[present.t()],
            lengths=present.t().flatten().long(),
        )
        return RecBatch(self.dense[rows], kjt, self.labels[rows])


def write_fake_criteo(path: str | Path, n: int, seed: int = 0) -> None:
    """Write ``n`` Criteo-format lines (with some missing fields) for tests and smoke runs."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        label = int(torch.randint(0, 2, (1,), generator=g))
        dense = [
            ""
            if torch.rand(1, generator=g) < 0.1
            else str(int(torch.randint(0, 50, (1,), generator=g)))
            for _ in range(CRITEO_DENSE)
        ]
        cats = [
            ""
            if torch.rand(1, generator=g) < 0.1
            else f"{int(torch.randint(0, 2**31, (1,), generator=g)):08x}"
            for _ in range(CRITEO_SPARSE)
        ]
        lines.append("\t".join([str(label), *dense, *cats]))
    Path(path).write_text("\n".join(lines) + "\n")
