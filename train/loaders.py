"""Loader backends (``data.backend``): torch (in-process) and NVIDIA DALI, one interface.

Every loader has ``next_batch()`` (this data-parallel rank's micro-batches of the next global
batch), ``state_dict()`` and ``load_state_dict()``; its position is a count of *global* samples
consumed, so a checkpoint taken on one data-parallel size resumes on another with the same
samples. The sample order is decided by our sampler alone (``TokenLoader._sample_index`` for
token shards, the batch index for click data), never by the backend: both backends therefore
yield bit-identical batches for the same seed, step range and data-parallel rank.

DALI backend: a pipeline fed by a *parallel* ``fn.external_source`` whose callback is a pure
function of DALI's iteration counter. ``data.dali_device=cpu`` (default) runs it on the CPU
(``device_id=None``); ``data.dali_device=gpu`` (token shards only) gives it ``device_id =
LOCAL_RANK`` and moves the windows to that GPU inside the pipeline (``.gpu()``), so casting and
slicing run there and the trainer receives CUDA tensors. DALI runs ``data.loader_threads`` worker processes that
read (memory-mapped token windows, or rows of click batches) ``data.prefetch`` batches ahead of
the trainer, and its own CPU threads do the casting, input/target slicing and batching. DALI's
file readers (``fn.readers.numpy``...) impose their own shuffling and sharding, which would break
layout invariance, so reading stays in our callback and DALI owns scheduling and prefetch
(follows DALI's "parallel external source" pattern).

Click data (``train.recsys_data``): a sample is (dense [Dn] fp32, ids [F] int64 with -1 for an
empty bag, label, true probability); the trainer-side KeyedJaggedTensor is rebuilt from the
micro-batch exactly as ``CriteoTSV.batch`` builds it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from train.data import TokenLoader, TokenShards

# -- token shards -----------------------------------------------------------------------------


class _TokenSource:
    """DALI parallel-external-source callback: (iteration, index in batch) -> one token window.

    Picklable (workers are spawned): it holds the shard path, not the memmap.
    """

    def __init__(self, path: str, dtype: str, vocab: int, loader_args: dict, start: int) -> None:
        self.path, self.dtype, self.vocab = path, dtype, vocab
        self.args, self.start = loader_args, start
        self._loader: TokenLoader | None = None

    def __call__(self, info: Any) -> np.ndarray:
        if self._loader is None:
            _worker_init()
            tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
            self._loader = TokenLoader(TokenShards(tokens, self.vocab), **self.args)
        ld, a = self._loader, self.args
        per_rank = a["global_batch"] // a["dp_size"]
        step, m = divmod(info.iteration, per_rank // a["micro_batch"])
        g = self.start + step * a["global_batch"] + ld.micro_offset(m) + info.idx_in_batch
        j, S = ld._sample_index(g), a["seq_len"]
        return np.ascontiguousarray(ld.shards.tokens[j * S : j * S + S + 1])


def _worker_init() -> None:
    """A forked worker must not enter the parent's OpenMP pool (it can hang after fork): one
    intra-op thread, as torch's own DataLoader workers do."""
    torch.set_num_threads(1)


def _start_method(gpu: bool = False) -> str:
    """DALI worker start: ``fork`` (fast: no re-import) unless CUDA is or will be initialised
    in this process (by torch, or by a GPU pipeline's own build), where only ``spawn`` is safe."""
    return "spawn" if gpu or torch.cuda.is_initialized() else "fork"


def _to_torch(tl: Any) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) -> a torch tensor that owns its memory (DALI reuses
    its output buffers on the next run)."""
    from nvidia.dali.backend import TensorListGPU

    if isinstance(tl, TensorListGPU):
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        return to_torch_tensor(tl.as_tensor(), copy=True)
    return torch.from_numpy(np.array(tl.as_array()))


DALI_DEVICES = ("cpu", "gpu")


def dali_device_id(device: str) -> int | None:
    """DALI's ``device_id``: ``None`` for a CPU pipeline, this process's LOCAL_RANK for GPU."""
    if device not in DALI_DEVICES:
        raise ValueError(f"data.dali_device={device!r}: use one of {', '.join(DALI_DEVICES)}")
    return None if device == "cpu" else int(os.environ.get("LOCAL_RANK", "0"))


class DaliTokenLoader:
    """``TokenLoader`` semantics on a DALI pipeline (same arguments, plus prefetch/threads).

    Args:
        shards: the token split (its memmap file is what DALI workers read).
        seq_len, global_batch, micro_batch, dp_rank, dp_size, seed, shuffle: as ``TokenLoader``.
        prefetch: batches DALI prepares ahead (``prefetch_queue_depth``).
        threads: DALI worker processes and CPU threads.
        device: ``cpu`` or ``gpu`` (outputs on GPU ``LOCAL_RANK``; ``data.dali_device``).
    """

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        prefetch: int = 2,
        threads: int = 2,
        device: str = "cpu",
    ) -> None:
        self.device_id = dali_device_id(device)
        self._ref = TokenLoader(
            shards, seq_len, global_batch, micro_batch, dp_rank, dp_size, seed, shuffle
        )  # validates the data and holds the public state
        self.seq_len, self.global_batch, self.micro_batch = seq_len, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.prefetch, self.threads = prefetch, threads
        self.path = str(shards.tokens.filename)
        self.dtype = np.dtype(shards.tokens.dtype).name
        self.vocab = shards.vocab_size
        self.consumed = 0
        self._pipe, self._pipe_pos = None, -1

    def _build(self) -> None:
        from nvidia.dali import fn, pipeline_def, types

        args = dict(
            seq_len=self.seq_len,
            global_batch=self.global_batch,
            micro_batch=self.micro_batch,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            seed=self.seed,
            shuffle=self.shuffle,
        )
        src = _TokenSource(self.path, self.dtype, self.vocab, args, self.consumed)
        S, on_gpu = self.seq_len, self.device_id is not None

        @pipeline_def(
            batch_size=self.micro_batch,
            num_threads=self.threads,
            device_id=self.device_id,
            py_num_workers=self.threads,
            py_start_method=_start_method(on_gpu),
            prefetch_queue_depth=self.prefetch,
            exec_dynamic=True,
        )
        def pipe():
            seq = fn.external_source(
                source=src,
                batch=False,
                parallel=True,
                dtype=types.UINT16 if self.dtype == "uint16" else types.UINT32,
                ndim=1,
            )
            seq = fn.cast(seq.gpu() if on_gpu else seq, dtype=types.INT64)
            return seq[0:S], seq[1 : S + 1]

        self.close()
        self._pipe = pipe()
        self._pipe.build()
        self._pipe_pos = self.consumed

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the next global batch: a list of (inputs_BS, targets_BS)."""
        if self._pipe is None or self._pipe_pos != self.consumed:
            self._build()
        out = []
        for _ in range(self.global_batch // self.dp_size // self.micro_batch):
            x, y = self._pipe.run()
            out.append((_to_torch(x), _to_torch(y)))
        self.consumed += self.global_batch
        self._pipe_pos = self.consumed
        return out

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        seed = int(state.get("seed", self.seed))
        if seed != self.seed:
            self.seed, self._pipe_pos = seed, -1
        self.consumed = consumed  # the pipeline is rebuilt at the next batch if it moved

    def close(self) -> None:
        """Stop the DALI pipeline and its workers."""
        if self._pipe is not None:
            del self._pipe
            self._pipe = None


def build_token_loader(
    data: Any,
    shards: TokenShards,
    seq_len: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    shuffle: bool,
) -> TokenLoader | DaliTokenLoader:
    """The token loader ``data.backend`` names (``torch`` or ``dali``)."""
    args = (shards, seq_len, global_batch, micro_batch, dp_rank, dp_size, seed, shuffle)
    if data.backend == "dali":
        return DaliTokenLoader(
            *args, prefetch=data.prefetch, threads=data.loader_threads, device=data.dali_device
        )
    return TokenLoader(*args)


# -- click data (recommenders) ---------------------------------------------------------------


class RecLoader:
    """Click batches for one data-parallel rank, in global samples (torch backend).

    Global batch ``k`` is ``data.batch(split, k, global_batch)``; rank ``r`` of ``dp_size`` takes
    rows ``[r*G/dp, (r+1)*G/dp)`` split into micro-batches (``RecBatch.slice``).
    """

    def __init__(
        self,
        data: Any,
        split: str,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        self.data, self.split = data, split
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed = 0

    def next_batch(self) -> list:
        """This rank's micro-batches (``RecBatch``) of the next global batch."""
        per_rank = self.global_batch // self.dp_size
        g = self.data.batch(self.split, self.consumed // self.global_batch, self.global_batch)
        lo = self.dp_rank * per_rank
        self.consumed += self.global_batch
        return [
            g.slice(lo + a, lo + a + self.micro_batch) for a in range(0, per_rank, self.micro_batch)
        ]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed_samples"])


def rec_rows(batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A ``RecBatch`` with at most one id per bag -> (dense [B,Dn], ids [B,F] (-1 = empty),
    labels [B], prob [B] (NaN when unknown)) as numpy arrays."""
    b = batch.labels.shape[0]
    kjt = batch.sparse
    lengths_FB = kjt.lengths().view(len(kjt.keys()), b)
    if lengths_FB.numel() and int(lengths_FB.max()) > 1:
        raise ValueError(
            f"data.backend=dali carries at most one id per bag (as Criteo and synthetic_clicks "
            f"have), but this batch has bags of {int(lengths_FB.max())} ids: use "
            "data.backend=torch"
        )
    ids_FB = torch.full(lengths_FB.shape, -1, dtype=torch.long)
    ids_FB[lengths_FB == 1] = kjt.values()
    prob = batch.prob if batch.prob is not None else torch.full((b,), float("nan"))
    return (
        batch.dense.float().numpy(),
        ids_FB.t().contiguous().numpy(),
        batch.labels.float().numpy(),
        prob.float().numpy(),
    )


class _RecSource:
    """DALI parallel-external-source batch callback: iteration -> one micro-batch of rows."""

    def __init__(self, data: Any, split: str, args: dict, start: int) -> None:
        self.data, self.split, self.args, self.start = data, split, args, start
        self._cache: tuple[int, tuple] | None = None

    def __call__(self, info: Any) -> tuple[list, list, list, list]:
        a = self.args
        if self._cache is None:
            _worker_init()
        per_rank = a["global_batch"] // a["dp_size"]
        step, m = divmod(info.iteration, per_rank // a["micro_batch"])
        k = self.start // a["global_batch"] + step
        if self._cache is None or self._cache[0] != k:
            self._cache = (k, rec_rows(self.data.batch(self.split, k, a["global_batch"])))
        lo = a["dp_rank"] * per_rank + m * a["micro_batch"]
        cols = self._cache[1]
        return tuple(
            [np.ascontiguousarray(c[i].reshape(-1)) for i in range(lo, lo + a["micro_batch"])]
            for c in cols
        )


class DaliRecLoader(RecLoader):
    """``RecLoader`` semantics on a DALI pipeline (workers build rows ``prefetch`` batches ahead)."""

    def __init__(
        self,
        data: Any,
        split: str,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        prefetch: int = 2,
        threads: int = 2,
    ) -> None:
        super().__init__(data, split, global_batch, micro_batch, dp_rank, dp_size)
        self.prefetch, self.threads = prefetch, threads
        self._pipe, self._pipe_pos = None, -1

    def _build(self) -> None:
        from nvidia.dali import fn, pipeline_def, types

        args = dict(
            global_batch=self.global_batch,
            micro_batch=self.micro_batch,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        src = _RecSource(self.data, self.split, args, self.consumed)

        @pipeline_def(
            batch_size=self.micro_batch,
            num_threads=self.threads,
            device_id=None,
            py_num_workers=self.threads,
            py_start_method=_start_method(),
            prefetch_queue_depth=self.prefetch,
            exec_dynamic=True,
        )
        def pipe():
            dense, ids, labels, prob = fn.external_source(
                source=src,
                num_outputs=4,
                batch=True,
                batch_info=True,
                parallel=True,
                dtype=[types.FLOAT, types.INT64, types.FLOAT, types.FLOAT],
                ndim=[1, 1, 1, 1],
            )
            return dense, ids, labels, prob

        self.close()
        self._pipe = pipe()
        self._pipe.build()
        self._pipe_pos = self.consumed

    def next_batch(self) -> list:
        """This rank's micro-batches (``RecBatch``) of the next global batch."""
        from torchrec import KeyedJaggedTensor

        from train.recsys_data import RecBatch

        if self._pipe is None or self._pipe_pos != self.consumed:
            self._build()
        out = []
        for _ in range(self.global_batch // self.dp_size // self.micro_batch):
            dense, ids, labels, prob = (_to_torch(t) for t in self._pipe.run())
            present = ids >= 0
            kjt = KeyedJaggedTensor.from_lengths_sync(
                keys=list(self.data.names),
                values=ids.t()[present.t()],
                lengths=present.t().flatten().long(),
            )
            prob = prob.reshape(-1)
            out.append(
                RecBatch(dense, kjt, labels.reshape(-1), None if torch.isnan(prob).any() else prob)
            )
        self.consumed += self.global_batch
        self._pipe_pos = self.consumed
        return out

    def close(self) -> None:
        """Stop the DALI pipeline and its workers."""
        if self._pipe is not None:
            del self._pipe
            self._pipe = None


def build_rec_loader(
    data_args: Any,
    data: Any,
    split: str,
    global_batch: int,
    micro_batch: int,
    rank: int,
    world: int,
) -> RecLoader:
    """The click loader ``data.backend`` names (``torch`` or ``dali``)."""
    if data_args.backend == "dali":
        return DaliRecLoader(
            data,
            split,
            global_batch,
            micro_batch,
            rank,
            world,
            prefetch=data_args.prefetch,
            threads=data_args.loader_threads,
        )
    return RecLoader(data, split, global_batch, micro_batch, rank, world)
