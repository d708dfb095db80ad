"""One multi-rank harness for every distributed test (TorchRec's MultiProcessTestBase, smaller).

``run_on_ranks(fn, world_size, *args)`` spawns ``world_size`` fresh processes, gives each the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT on a free
port), initialises a gloo process group with a short timeout (a mismatched collective fails
instead of hanging), runs ``fn(rank, world_size, *args)`` deterministically, and returns every
rank's return value. Any rank that raises, dies or overruns fails the test with its traceback.
``fn`` must be a module-level function (it is pickled into the children).

The ranks fork from one forkserver per test process that has imported torch, torchrec and the
trainer once (``PRELOAD``): a fresh ``spawn`` re-imports them in every rank, which on 2 cores
made starting 8 ranks take ~70 s against ~4 s forked (both measured beside another 8-rank job),
most of a small test's time. The server
is forked before any tensor work (no OpenMP pool, no threads); each rank gets the caller's
environment as it is at the call (a forkserver child would otherwise see the server's).
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRELOAD = ["tests.distributed.harness", "train.trainer", "train.families"]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(
    rank: int,
    world_size: int,
    port: int,
    local_world_size: int,
    fn: Callable[..., Any],
    args: tuple,
    timeout_s: float,
    queue: Any,
    init_pg: bool,
    result_dir: str,
    env: dict[str, str],
) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank % local_world_size),
        LOCAL_WORLD_SIZE=str(local_world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    try:
        if init_pg:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
            )
        result = fn(rank, world_size, *args)
        # Tensors go through a file: a queue would hand over shared memory that dies with us.
        path = os.path.join(result_dir, f"rank{rank}.pt")
        torch.save(result, path)
        queue.put((rank, "ok", path))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        gc.collect()  # objects holding gloo work die before the group does (see trainer_utils)
        if init_pg and dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    local_world_size: int | None = None,
    timeout_s: float = 120.0,
    init_pg: bool = True,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results.

    Args:
        fn: module-level function; its return value must be picklable (tensors are fine).
        world_size: number of ranks.
        local_world_size: ranks per simulated host (default: all on one host).
        timeout_s: collective timeout and, times two, the wall-clock limit of the whole run.
        init_pg: create the default gloo group before calling ``fn``.

    Returns:
        The per-rank return values, indexed by rank.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when this process's server starts
    result_dir = tempfile.mkdtemp(prefix="harness-")
    queue = ctx.Queue()
    port = free_port()
    lws = local_world_size or world_size
    procs = [
        ctx.Process(
            target=_child,
            args=(
                r,
                world_size,
                port,
                lws,
                fn,
                args,
                timeout_s,
                queue,
                init_pg,
                result_dir,
                dict(os.environ),
            ),
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=2 * timeout_s + 60)
            if status == "ok":
                results[rank] = torch.load(payload, weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break
    except Exception as exc:  # queue.Empty: some rank hung or died silently
        errors.append(f"ranks did not finish in time ({type(exc).__name__}); got {sorted(results)}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(result_dir, ignore_errors=True)
    if errors:
        raise AssertionError("distributed run failed:\n" + "\n".join(errors))
    codes = [p.exitcode for p in procs]
    assert all(c == 0 for c in codes), f"rank exit codes {codes}"
    return [results[r] for r in range(world_size)]
