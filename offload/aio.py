"""Aligned asynchronous file I/O for the NVMe tier, plus aligned (pinned) host buffers.

Owns: ``aligned_empty`` (page-aligned host tensors, pinned when CUDA exists), ``AsyncFileIO``
(submit a read or write of a whole tensor at a file offset, wait on the returned ticket; its
``empty`` hands out the staging buffers its backend transfers fastest) and ``probe_direct_io``
(does this filesystem accept O_DIRECT?).

Backends, in order of preference (``backend="auto"``):

* ``deepspeed``: DeepSpeed's ``async_io`` op (libaio, ZeRO-Infinity's NVMe engine) when it is
  installed *and already built or buildable* (needs Debian ``libaio-dev``).
* ``threads``: a pool of threads issuing ``os.preadv``/``os.pwritev`` on an ``O_DIRECT`` file
  descriptor in aligned 1 MiB-multiple chunks. Written here because the standard library has no
  asynchronous file API; ``preadv`` releases the GIL, so a handful of threads keep the device
  queue full (the same idea as DeepSpeed's ``intra_op_parallelism``).
* ``buffered``: the same pool without ``O_DIRECT`` (tmpfs, overlayfs and some network
  filesystems reject it with EINVAL); data goes through the page cache.

O_DIRECT needs the buffer address, the length and the file offset aligned to the logical block
size; every tensor handed to this module comes from ``aligned_empty`` and every length is padded
to ``ALIGN`` bytes by the caller (``offload.tiers`` pads subgroups to 1024 fp32 elements).

How the host memory behind a buffer was first touched matters as much as the queue depth.
O_DIRECT DMAs straight into the buffer's pages, so every request carries one scatter-gather
segment per *physically* contiguous run (at most 254 per request on the development machine's
virtio disk). A torch tensor first filled by several OpenMP threads gets its pages faulted in
interleaved order, i.e. physically scattered (thousands of runs per 48 MiB), and so do
DeepSpeed's page-locked 4 KiB pages once host memory is fragmented. Unpinned buffers from
``aligned_empty`` are therefore anonymous mappings starting on a 2 MiB boundary, advised for
transparent huge pages and populated page by page, in address order, by one thread;
DeepSpeed's page-locked buffers (``AsyncFileIO.empty``) are collapsed into huge pages after
allocation. Both then show ~24 physical runs per 48 MiB. On that disk, reading into scattered
buffers ran at 0.70-0.94 (six runs, typically ~0.85) of the read bandwidth into contiguous
ones in the same run (``benchmarks/offload_io.py``, the ``threads_scattered`` row).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ALIGN = 4096
"""Byte alignment of buffers, lengths and offsets (covers 512 B and 4 KiB logical blocks)."""


def aligned_empty(
    numel: int, dtype: torch.dtype = torch.float32, pin: bool | None = None
) -> torch.Tensor:
    """A 1-D host tensor whose data pointer is ``ALIGN``-byte aligned, its pages resident.

    Args:
        numel: elements.
        dtype: element type.
        pin: page-lock the memory (default: only when CUDA is available, since pinning without a
            device is useless and on small hosts pinned memory is the first thing to OOM).
            Unpinned buffers are populated at allocation, in address order (module docstring).

    Returns:
        Tensor of shape ``(numel,)`` (contents unspecified).
    """
    pin = torch.cuda.is_available() if pin is None else pin
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    if not pin and nbytes > 0:
        mapped = _mapped_empty(nbytes)
        if mapped is not None:
            return mapped.view(dtype)
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift : shift + nbytes].view(dtype)


HUGE = 2 << 20
"""Transparent huge page size: buffers of at least this size start on such a boundary."""


def _mapped_empty(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of anonymous memory as a uint8 tensor, starting on a ``HUGE`` boundary when it
    is that large, advised for huge pages and populated in address order by this thread; None
    where mmap is unavailable. The tensor holds the mapping alive (unmapped with the last view);
    the slack before the aligned start is never touched, so it costs no memory."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    slack = HUGE if nbytes >= HUGE else 0
    try:
        region = mmap.mmap(-1, nbytes + slack, flags=flags)
    except (OSError, TypeError, ValueError):
        return None
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # THP disabled ("never"): 4 KiB pages, still touched in order
        with contextlib.suppress(OSError):
            region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    shift = (-whole.data_ptr()) % HUGE if slack else 0
    touch = np.frombuffer(region, dtype=np.uint8)[shift : shift + nbytes]
    touch[:: mmap.PAGESIZE] = 0  # first touch: one write per page, lowest address first
    del touch
    return whole[shift : shift + nbytes]


def _collapse_huge(t: torch.Tensor) -> int:
    """Best effort: back the ``HUGE``-aligned part of ``t``'s (resident) memory with huge pages
    now (Linux >= 6.1 ``MADV_COLLAPSE``).

    Returns:
        0 when collapsed (or nothing to collapse), else the errno: ``EAGAIN``/``ENOMEM`` when
        the kernel has no free huge pages (fragmented host memory; retried twice on EAGAIN),
        ``EINVAL`` where unsupported. The buffer works either way, with 4 KiB pages.
    """
    lo = -(-t.data_ptr() // HUGE) * HUGE
    hi = (t.data_ptr() + t.numel() * t.element_size()) // HUGE * HUGE
    if hi <= lo:
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return errno.ENOSYS
    err = 0
    for _ in range(3):
        if libc.madvise(lo, hi - lo, getattr(mmap, "MADV_COLLAPSE", 25)) == 0:
            return 0
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
    return err


def probe_direct_io(folder: str | Path) -> bool:
    """True when files in ``folder`` can be opened with O_DIRECT and written aligned."""
    if not hasattr(os, "O_DIRECT"):
        return False
    path = Path(folder) / f".odirect_probe_{os.getpid()}_{threading.get_ident()}"
    buf = aligned_empty(ALIGN // 4, pin=False)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.pwritev(fd, [_bytes_view(buf)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class Ticket:
    """One submitted read or write; ``wait()`` blocks until it is complete (raises its error)."""

    def __init__(self, waiter: Callable[[], None]) -> None:
        self._waiter = waiter
        self._done = False

    def wait(self) -> None:
        if not self._done:
            self._waiter()
            self._done = True


def _deepspeed_aio_handle(block_size: int, queue_depth: int, threads: int):
    """A DeepSpeed ``aio_handle`` if the op is compatible and loads; else None."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            return None
        return builder.load(verbose=False).aio_handle(
            block_size, queue_depth, False, False, threads
        )
    except Exception:
        return None


class AsyncFileIO:
    """Submit whole-tensor reads/writes at a byte offset of a file; overlap them with compute.

    Args:
        folder: directory of the files (used to probe O_DIRECT support).
        backend: ``auto``, ``deepspeed``, ``threads`` or ``buffered``.
        threads: I/O threads (``threads``/``buffered``) or DeepSpeed intra-op parallelism.
        chunk_bytes: size of one ``preadv``/``pwritev`` (multiple of ``ALIGN``).

    Example::

        io = AsyncFileIO("/nvme/run")
        t = io.write(buf, "/nvme/run/sg0.bin", 0); ...; t.wait()
    """

    def __init__(
        self,
        folder: str | Path,
        backend: str = "auto",
        threads: int = 4,
        chunk_bytes: int = 4 << 20,
    ) -> None:
        if backend not in ("auto", "deepspeed", "threads", "buffered"):
            raise ValueError(
                f"offload.io_backend={backend!r}: use auto, deepspeed, threads or buffered"
            )
        assert chunk_bytes % ALIGN == 0
        self.chunk_bytes = chunk_bytes
        self.direct = probe_direct_io(folder)
        self._ds_pool: list = []
        self._ds_lock = threading.Lock()
        from offload.kernels import deepspeed_op_ready

        wants_ds = backend == "deepspeed" or (backend == "auto" and deepspeed_op_ready("async_io"))
        if wants_ds and self.direct:
            first = _deepspeed_aio_handle(1 << 20, 32, threads)
            if first is not None:
                self._ds_pool = [first]
                self._ds_args = (1 << 20, 32, threads)
        if backend == "deepspeed" and not self._ds_pool:
            raise RuntimeError(
                "offload.io_backend=deepspeed but DeepSpeed's async_io op is unavailable "
                "(install deepspeed and Debian libaio-dev, on a filesystem with O_DIRECT), "
                "or use io_backend=auto"
            )
        if self._ds_pool:
            self.backend = "deepspeed"
        elif backend == "buffered" or not self.direct:
            self.backend, self.direct = "buffered", False
        else:
            self.backend = "threads"
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lattice-aio")
        self._fds: dict[tuple[str, bool], int] = {}
        self._fd_lock = threading.Lock()
        # (buffer handed out, DeepSpeed-managed allocation behind it), freed by close()
        self._locked: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.collapse_errors: list[int] = []
        """errnos of page-locked buffers the kernel could not put on huge pages (they work
        with 4 KiB pages, at the read bandwidth cost the module docstring gives)."""

    # -- staging buffers ------------------------------------------------------------------------
    def empty(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An ``ALIGN``-aligned host buffer this backend transfers without an extra copy.

        DeepSpeed's async_io bounces every transfer through a temporary buffer of its own unless
        the tensor is pinned by CUDA or page-locked by DeepSpeed; without CUDA the buffer is
        therefore taken from DeepSpeed's page-locked allocator (when ``RLIMIT_MEMLOCK`` allows)
        and freed by ``close()``, after which it must not be used. Every other case is
        ``aligned_empty``.
        """
        if self.backend == "deepspeed" and not torch.cuda.is_available():
            t = self._ds_locked_empty(numel, dtype)
            if t is not None:
                return t
        return aligned_empty(numel, dtype)

    def free(self, t: torch.Tensor) -> None:
        """Give back a buffer from ``empty`` now instead of at ``close`` (then drop ``t``)."""
        for i, (view, _) in enumerate(self._locked):
            if view is t:
                handle = self._ds_acquire()
                handle.free_cpu_locked_tensor(self._locked.pop(i)[1])
                self._ds_release(handle)
                return

    def _ds_locked_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A DeepSpeed page-locked buffer starting on a huge-page boundary, collapsed into huge
        pages: DeepSpeed's allocator (``posix_memalign`` + ``mlock``) hands out 4 KiB pages,
        physically scattered once host memory is fragmented (module docstring)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = numel * itemsize
        slack = HUGE if nbytes >= HUGE else 0
        if nbytes == 0 or not _can_lock(nbytes + slack + sum(b.nbytes for _, b in self._locked)):
            return None
        handle = self._ds_acquire()
        try:
            base = handle.new_cpu_locked_tensor(
                (nbytes + slack) // itemsize, torch.empty(0, dtype=dtype)
            )
        except Exception:
            return None
        finally:
            self._ds_release(handle)
        if base.data_ptr() == 0 or base.data_ptr() % ALIGN:
            return None
        shift = ((-base.data_ptr()) % HUGE) // itemsize if slack else 0
        view = base[shift : shift + numel]
        err = _collapse_huge(view)
        if err:
            self.collapse_errors.append(err)
        self._locked.append((view, base))
        return view

    # -- file descriptors -----------------------------------------------------------------------
    def _fd(self, path: str, write: bool) -> int:
        key = (path, write)
        with self._fd_lock:
            fd = self._fds.get(key)
            if fd is None:
                flags = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
                if self.direct:
                    flags |= os.O_DIRECT
                fd = os.open(path, flags, 0o600)
                self._fds[key] = fd
            return fd

    def close(self) -> None:
        """Close descriptors, stop the threads and free the buffers ``empty`` page-locked
        (pending tickets must be waited first). Calling it twice is harmless."""
        self._pool.shutdown(wait=True)
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self._locked:
            handle = self._ds_acquire()
            for _, base in self._locked:
                handle.free_cpu_locked_tensor(base)
            self._locked.clear()
            self._ds_release(handle)

    # -- DeepSpeed handles: one outstanding batch per handle, so keep a small pool ---------------
    def _ds_acquire(self):
        with self._ds_lock:
            if self._ds_pool:
                return self._ds_pool.pop()
        return _deepspeed_aio_handle(*self._ds_args)

    def _ds_release(self, handle) -> None:
        with self._ds_lock:
            self._ds_pool.append(handle)

    # -- submission -----------------------------------------------------------------------------
    def _check(self, t: torch.Tensor, offset: int) -> None:
        nbytes = t.numel() * t.element_size()
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("AsyncFileIO needs a contiguous host tensor")
        if self.direct and (t.data_ptr() % ALIGN or nbytes % ALIGN or offset % ALIGN):
            raise ValueError(
                f"O_DIRECT needs {ALIGN}-byte aligned buffer, length and offset "
                f"(ptr%{ALIGN}={t.data_ptr() % ALIGN}, bytes={nbytes}, offset={offset}); "
                "allocate with offload.aio.aligned_empty and pad the length"
            )

    def _submit(self, t: torch.Tensor, path: str | Path, offset: int, write: bool) -> Ticket:
        self._check(t, offset)
        path = str(path)
        if self.backend == "deepspeed":
            handle = self._ds_acquire()
            if write:
                handle.async_pwrite(t.reshape(-1).view(torch.uint8), path, offset)
            else:
                handle.async_pread(t.reshape(-1).view(torch.uint8), path, offset)

            def waiter() -> None:
                try:
                    handle.wait()
                finally:
                    self._ds_release(handle)

            return Ticket(waiter)
        fd = self._fd(path, write)
        view = _bytes_view(t)
        futures: list[Future] = []
        for start in range(0, len(view), self.chunk_bytes):
            chunk = view[start : start + self.chunk_bytes]
            futures.append(self._pool.submit(_rw_all, fd, chunk, offset + start, write))

        def waiter() -> None:
            for f in futures:
                f.result()

        return Ticket(waiter)

    def read(self, t: torch.Tensor, path: str | Path, offset: int = 0) -> Ticket:
        """Start reading ``t.nbytes`` bytes of ``path`` at ``offset`` into ``t``."""
        return self._submit(t, path, offset, write=False)

    def write(self, t: torch.Tensor, path: str | Path, offset: int = 0) -> Ticket:
        """Start writing ``t`` into ``path`` at ``offset``."""
        return self._submit(t, path, offset, write=True)


def _can_lock(nbytes: int) -> bool:
    """Whether this process may page-lock ``nbytes`` more (root, or RLIMIT_MEMLOCK allows)."""
    try:
        import resource
    except ImportError:
        return False
    if os.geteuid() == 0:
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return soft == resource.RLIM_INFINITY or nbytes <= soft


def _rw_all(fd: int, chunk: memoryview, offset: int, write: bool) -> None:
    """Loop until the whole chunk is transferred (short reads/writes are legal)."""
    done = 0
    while done < len(chunk):
        part = chunk[done:]
        n = os.pwritev(fd, [part], offset + done) if write else os.preadv(fd, [part], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"{'write' if write else 'read'} returned {n} at {offset}")
        done += n
