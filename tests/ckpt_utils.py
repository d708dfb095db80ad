"""Tiny objects for checkpoint tests: a model, its optimizer after a step, state snapshots, and
the fault-injecting shard writer."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from checkpoint.engine import FileWriter
from train.config import CheckpointArgs


def tiny_model(seed: int = 0, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 8))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int, mgr=None) -> None:
    g = torch.Generator().manual_seed(seed)
    width = next(model.parameters()).shape[-1]
    x = torch.randn(16, width, generator=g)
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    if mgr is not None:
        mgr.wait_before_update()
    opt.step()


def make(seed: int = 0, width: int = 64) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = tiny_model(seed, width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def args(root, mode: str = "sync", **kw) -> CheckpointArgs:
    kw.setdefault("enabled", True)
    return CheckpointArgs(mode=mode, dir=str(root), **kw)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Full (unsharded) clones of model + optimizer state under the checkpoint's names."""
    out = {}
    for k, v in get_model_state_dict(model).items():
        out[f"model/{k}"] = _full(v)
    for k, st in get_optimizer_state_dict(model, opt)["state"].items():
        for kk, v in st.items():
            out[f"optim/{k}/{kk}"] = _full(v)
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class FaultInjectingWriter(FileWriter):
    """A ``checkpoint.engine.ShardWriter`` that misbehaves on purpose.

    Args:
        copy_delay_s: sleep after each piece copied to the host (a copy slower than a step).
        pause_after_bytes: once this many bytes of a shard are written, touch ``pause_marker``
            and hang (the test then SIGKILLs the process mid-file); -1 = never.
        pause_at: a commit point (``before_index``, ``before_latest``) to hang at likewise.
        enospc_after_bytes: a write that would pass this many bytes raises ``ENOSPC``, as a
            full disk would; -1 = never.
        pause_marker: the file touched (holding the pid) when hanging.
    """

    def __init__(
        self,
        copy_delay_s: float = 0.0,
        pause_after_bytes: int = -1,
        pause_at: str = "",
        enospc_after_bytes: int = -1,
        pause_marker: str = "",
    ) -> None:
        self.copy_delay_s = copy_delay_s
        self.pause_after_bytes = pause_after_bytes
        self.pause_at = pause_at
        self.enospc_after_bytes = enospc_after_bytes
        self.pause_marker = pause_marker

    @classmethod
    def from_spec(cls, spec: str) -> FaultInjectingWriter:
        """From ``key=value,key=value`` (the argument names), as a subprocess receives it."""
        kv = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
        types = {"copy_delay_s": float, "pause_after_bytes": int, "enospc_after_bytes": int}
        return cls(**{k: types.get(k, str)(v) for k, v in kv.items()})

    def open(self, path: Path):
        return _FaultyFile(super().open(path), self)

    def piece_copied(self, nbytes: int) -> None:
        if self.copy_delay_s:
            time.sleep(self.copy_delay_s)

    def point(self, name: str) -> None:
        if name == self.pause_at:
            self.hang()

    def hang(self) -> None:
        Path(self.pause_marker).write_text(str(os.getpid()))
        while True:
            time.sleep(3600)


class _FaultyFile:
    """The shard file, counting bytes: ENOSPC or a hang where the writer says."""

    def __init__(self, raw, faults: FaultInjectingWriter) -> None:
        self.raw, self.faults, self.written = raw, faults, 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if 0 <= self.faults.enospc_after_bytes < self.written + n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        out = self.raw.write(data)
        self.written += n
        if 0 <= self.faults.pause_after_bytes <= self.written:
            self.faults.hang()
        return out

    def fileno(self) -> int:
        return self.raw.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.raw.close()
