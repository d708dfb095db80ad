"""The default process group on a store namespaced by the launch attempt (torchrun restarts).

torchrun's agent hosts one TCPStore for the whole job (the static rendezvous creates it once and
reuses it on every restart) and hands it to the workers as MASTER_ADDR/MASTER_PORT
(``TORCHELASTIC_USE_AGENT_STORE=True``) with no per-attempt prefix: ``init_process_group`` adds
only the fixed ``default_pg``. gloo publishes each rank's listening address under
``default_pg/0//cpu//0/<rank>``; after a restart those keys still hold the dead workers'
addresses, so a rank that looks a peer up before the peer has re-published dials a closed port:
"Gloo connectFullMesh failed ... Connection refused" (or a hang), every time one rank starts
later than another (Lattice's seconds of start-up make that certain). Prefixing every key with
the run id and ``TORCHELASTIC_RESTART_COUNT`` gives each attempt fresh keys; every group made
later (``new_group``, DeviceMesh) inherits the prefixed store. All agents share the restart
count because torchrun restarts the whole worker group together.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist


def attempt_prefix() -> str:
    env = os.environ
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    return f"lattice/{run_id}/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def init_process_group(backend: str, timeout: timedelta) -> None:
    """``dist.init_process_group`` from the environment; under torchrun's agent store, on a
    store prefixed by this attempt."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    base = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(attempt_prefix(), base),
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        timeout=timeout,
    )
