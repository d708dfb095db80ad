"""One rank of the crash-safety test (run as a subprocess so the test can SIGKILL it).

Usage: python tests/distributed/ckpt_crash_worker.py <root>; the torchrun-style environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) says which rank. Saves step 1 synchronously
(committed), then registers a lazy save of step 2 whose writer (``FaultInjectingWriter``, from
the ``CRASH_HOOK`` spec) pauses mid-file or at a commit point.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist


def main(root: str) -> None:
    from checkpoint import Manager
    from tests.ckpt_utils import FaultInjectingWriter, args, make, train_step

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    model, opt = make(width=256)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        fully_shard(model, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hook = os.environ.pop("CRASH_HOOK", "")
    mgr = Manager(args(root, "sync"), root)
    mgr.attach(model, opt)
    train_step(model, opt, 1)
    mgr.save_async(1)
    if hook:
        mgr.engine.writer = FaultInjectingWriter.from_spec(hook)
    mgr.args.mode = "lazy_async"
    train_step(model, opt, 2)
    mgr.save_async(2)
    train_step(model, opt, 3, mgr)
    mgr.finalize()
    time.sleep(600)  # only reached if no one paused; the test kills us anyway


if __name__ == "__main__":
    main(sys.argv[1])
