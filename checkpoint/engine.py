"""Lazy asynchronous snapshot engine (DataStates-LLM, Maurya et al., HPDC 2024).

Parameters and optimizer state do not change between one optimizer step and the next, so a
checkpoint registered right after step N can be copied to host memory while step N+1 runs its
forward and backward. This module owns that machinery for one rank:

* ``HostRing``: one reusable host arena (pinned when CUDA exists) whose size is the configured
  byte budget; pieces are allocated and freed in FIFO order, so a state larger than the budget
  streams through it (the copy then waits for the writer to free space).
* a copier thread that slices every tensor's bytes into pieces, copies them into the arena and
  hands them to the writer; it sets ``copy_done`` when the last byte is on the host;
* a writer thread that appends pieces to this rank's shard file, hashes them (sha256) on the fly,
  fsyncs, and then runs the commit protocol (``commit_fn``) on a dedicated gloo group.

torch offers pieces of this (DCP ``async_save`` stages with a blocking copy at call time, then
writes in a thread); what it lacks is the deferred copy that overlaps compute, the bounded
reusable arena, and a commit with integrity hashes, so this part is written here.

Storage goes through a ``ShardWriter`` (``SnapshotEngine.writer``): ``FileWriter`` opens the
shard file and ignores the two observation points (a piece copied to the host, a named point of
the commit protocol). Tests inject faults by swapping the writer
(``tests/ckpt_utils.FaultInjectingWriter``: slow copies, a pause mid-file or at a commit point to
be SIGKILLed there, ``ENOSPC`` as from a full disk); the loops below contain none.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from checkpoint.format import CheckpointError


def _background_priority(nice: int = 10) -> None:
    """Lower this thread's CPU priority (Linux threads have their own nice value), so that when
    host cores are oversubscribed the checkpoint's copy/hash/write yield to training instead of
    stalling it. The copy still finishes long before the next update in the common case."""
    if threading.current_thread() is threading.main_thread():
        return  # sync/async modes copy on the caller's thread: leave the trainer alone
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class ShardWriter(Protocol):
    """Where the engine's bytes go, and the points a test may act at."""

    def open(self, path: Path) -> BinaryIO:
        """The shard file, opened for writing (``write``, ``fileno``, a context manager)."""

    def piece_copied(self, nbytes: int) -> None:
        """Called by the copier after each piece reaches host memory."""

    def point(self, name: str) -> None:
        """Called at a named point of the commit protocol (``before_index``, ...)."""


class FileWriter:
    """The production ``ShardWriter``: an unbuffered file; the observation points do nothing."""

    def open(self, path: Path) -> BinaryIO:
        return open(path, "wb", buffering=0)

    def piece_copied(self, nbytes: int) -> None:
        pass

    def point(self, name: str) -> None:
        pass


def pause_point(writer: ShardWriter, point: str) -> None:
    """Tell ``writer`` the commit reached ``point`` (a test's writer may stop there)."""
    writer.point(point)


# Largest piece copied, hashed and written at once. Measured on the 2-core CPU box (stall of the
# iterations after a lazy save): 64 MiB pieces stalled less than 4 MiB or 1 MiB ones.
PIECE_BYTES = 64 << 20


class HostRing:
    """A FIFO ring allocator over one reusable host byte arena of ``nbytes``."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.size = max(1, int(nbytes))
        self.buf = torch.empty(self.size, dtype=torch.uint8, pin_memory=pin)
        self._live: deque[tuple[int, int]] = deque()
        self._cond = threading.Condition()
        self.aborted = False

    def alloc(self, n: int) -> int:
        """Start of ``n`` free contiguous bytes (blocks until the writer frees enough)."""
        assert 0 < n <= self.size
        with self._cond:
            while True:
                if self.aborted:
                    raise CheckpointError("checkpoint copy aborted")
                start = self._fit(n)
                if start is not None:
                    self._live.append((start, start + n))
                    return start
                self._cond.wait()

    def _fit(self, n: int) -> int | None:
        if not self._live:
            return 0
        tail, head = self._live[0][0], self._live[-1][1]
        if head > tail:  # live region [tail, head): free space at the end, then at the start
            if head + n <= self.size:
                return head
            return 0 if n <= tail else None
        return head if head + n <= tail else None  # wrapped: free space is [head, tail)

    def free(self) -> None:
        with self._cond:
            self._live.popleft()
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self.aborted = True
            self._cond.notify_all()


@dataclass
class WriteItem:
    """One chunk this rank writes: live tensor (not copied yet) and its place in the file."""

    tensor: torch.Tensor
    byte_offset: int
    nbytes: int


@dataclass
class SaveJob:
    """One registered checkpoint on one rank."""

    step: int
    shard_path: Path
    items: list[WriteItem]
    file_bytes: int
    commit_fn: Callable[[SaveJob], None]
    prepare_fn: Callable[[SaveJob], None]
    copy_done: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    sha256: str = ""
    copy_s: float = 0.0
    durable_s: float = 0.0
    t0: float = field(default_factory=time.perf_counter)


class SnapshotEngine:
    """Copies a rank's registered tensors to host and writes them in the background."""

    def __init__(self, budget_bytes: int, pin: bool, writer: ShardWriter | None = None) -> None:
        self.budget = int(budget_bytes)
        self.pin = pin
        self.ring: HostRing | None = None
        self.writer: ShardWriter = writer or FileWriter()
        self._threads: list[threading.Thread] = []

    def reserve(self, total: int) -> None:
        """Allocate and pre-fault the host ring for a state of ``total`` bytes in a background
        (low-priority) thread, so the first save does not pay page faults while it races the
        next update."""

        def work() -> None:
            _background_priority()
            ring = HostRing(max(4096, min(self.budget, total)), self.pin)
            ring.buf[::4096].fill_(0)  # touch every page
            self.ring = ring

        self._reserving = threading.Thread(target=work, daemon=True, name="ckpt-reserve")
        self._reserving.start()
        self._threads.append(self._reserving)

    def _ring_for(self, total: int) -> HostRing:
        reserving = getattr(self, "_reserving", None)
        if reserving is not None:
            reserving.join()
            self._reserving = None
        want = max(4096, min(self.budget, total))
        if self.ring is None or self.ring.size < want:  # grows once, then reused every save
            self.ring = HostRing(want, self.pin)
        self.ring.aborted = False
        return self.ring

    def start(self, job: SaveJob, lazy: bool) -> None:
        """Start copier and writer threads; with ``lazy=False`` the copy finishes before return."""
        ring = self._ring_for(job.file_bytes)
        pieces: queue.Queue = queue.Queue()
        piece_max = max(1, min(ring.size // 4 if ring.size >= 1 << 20 else ring.size, PIECE_BYTES))
        copier = threading.Thread(
            target=self._copy, args=(job, ring, pieces, piece_max), daemon=True, name="ckpt-copy"
        )
        writer = threading.Thread(
            target=self._write, args=(job, ring, pieces), daemon=True, name="ckpt-write"
        )
        self._threads = [t for t in self._threads if t.is_alive()]
        writer.start()
        self._threads.append(writer)
        if lazy:
            copier.start()
            self._threads.append(copier)
        else:
            self._copy(job, ring, pieces, piece_max)

    def join(self) -> None:
        """Wait for every background thread to leave: a daemon thread still inside a torch
        C++ call (fill_, copy_, a gloo collective) when the interpreter finalizes is killed by
        pthread_exit in take_gil, which unwinds through a noexcept frame: std::terminate,
        "terminate called without an active exception", SIGABRT."""
        for t in self._threads:
            t.join()
        self._threads.clear()
        self._reserving = None

    def _copy(self, job: SaveJob, ring: HostRing, pieces: queue.Queue, piece_max: int) -> None:
        _background_priority()
        t0 = time.perf_counter()
        try:
            for item in job.items:
                src = item.tensor.detach().reshape(-1).view(torch.uint8)
                for a in range(0, item.nbytes, piece_max):
                    n = min(piece_max, item.nbytes - a)
                    s = ring.alloc(n)
                    dst = ring.buf[s : s + n]
                    dst.copy_(src[a : a + n], non_blocking=src.is_cuda)
                    if src.is_cuda:
                        torch.cuda.current_stream(src.device).synchronize()
                    self.writer.piece_copied(n)
                    pieces.put((item.byte_offset + a, s, n))
        except BaseException as e:
            job.error = job.error or e
        finally:
            job.copy_s = time.perf_counter() - t0
            job.copy_done.set()
            pieces.put(None)

    def _write(self, job: SaveJob, ring: HostRing, pieces: queue.Queue) -> None:
        _background_priority()
        try:
            job.prepare_fn(job)
            job.shard_path.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with self.writer.open(job.shard_path) as f:
                pos = self._write_pieces(job, ring, pieces, f, h)
                if job.error is None and job.file_bytes > pos:
                    pad = bytes(job.file_bytes - pos)
                    f.write(pad)
                    h.update(pad)
                if job.error is None:
                    os.fsync(f.fileno())
            job.sha256 = h.hexdigest()
        except OSError as e:
            job.error = job.error or CheckpointError(
                f"writing {job.shard_path} failed: {e}; the previous checkpoint is kept"
            )
        except BaseException as e:
            job.error = job.error or e
        try:
            job.commit_fn(job)  # collective on the checkpoint group: every rank must enter
        except BaseException as e:
            job.error = e
        finally:
            job.durable_s = time.perf_counter() - job.t0
            job.done.set()

    @staticmethod
    def _write_pieces(job: SaveJob, ring: HostRing, pieces: queue.Queue, f, h) -> int:
        """Append the copier's pieces at their offsets (zero padding between), hashing them;
        returns the bytes written. After an error, pieces are only drained."""
        pos = 0
        while (piece := pieces.get()) is not None:
            off, s, n = piece
            try:
                if job.error is not None:
                    continue  # drain so the copier never blocks on a full ring
                if off > pos:  # alignment padding
                    pad = bytes(off - pos)
                    f.write(pad)
                    h.update(pad)
                    pos = off
                mv = memoryview(ring.buf[s : s + n].numpy())
                f.write(mv)
                h.update(mv)
                pos += n
            except OSError as e:
                job.error = job.error or CheckpointError(
                    f"writing {job.shard_path} failed: {e} (disk full? free space or "
                    f"point checkpoint.dir elsewhere); the previous checkpoint is kept"
                )
            finally:
                ring.free()
        return pos
