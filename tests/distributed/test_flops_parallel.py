"""Per-rank FLOPs under tensor and Ulysses sequence parallelism: ``FlopCounterMode``'s count of
one rank's training step equals the analytic global count / world size (TP and SP split the
math, they do not change the total). Math SDPA so the counter sees attention; it counts the
full S x S, hence ``attention="full"``.

``FlopCounterMode`` sees a DTensor op before DTensor runs it, at the global shapes: the count
of a tensor-parallel linear would be the whole layer's on every rank. ``LocalFlopCounter``
declines DTensor ops (``NotImplemented``), so DTensor dispatches them and the counter counts
the local ops it runs: what this rank executes. Ops on fake tensors (DTensor's sharding
propagation runs some ops on fake tensors at the global shapes) execute nothing and are not
counted."""

from __future__ import annotations

import pytest
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

from tests.distributed.harness import run_on_ranks

pytestmark = pytest.mark.distributed


class _LocalMode(_FlopCounterMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs it; its local ops come back here
        if any(issubclass(t, FakeTensor) for t in types):
            return func(*args, **(kwargs or {}))  # DTensor's shape propagation: not executed
        return super().__torch_dispatch__(func, types, args, kwargs)


class LocalFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` counting this rank's local shards of DTensor ops."""

    def __enter__(self) -> LocalFlopCounter:
        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        self.mode = _LocalMode(self)
        self.mode.__enter__()
        return self


def _count_rank(rank: int, world: int, overrides: list[str]) -> tuple[float, float]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.trainer_utils import TINY
    from train.cli import load_config
    from train.flops import gpt_step_flops
    from train.trainer import Trainer, plan_run

    job, cfg = load_config(TINY + overrides)
    trainer = Trainer(job, cfg, plan_run(job))
    try:
        fam = trainer.family
        batch = trainer.train_loader.next_batch()
        with sdpa_kernel(SDPBackend.MATH), LocalFlopCounter(display=False) as fc:
            fam.forward_backward(trainer.model, batch)
        t = job.train
        full = gpt_step_flops(fam.model_config(), t.global_batch_size, t.seq_len, attention="full")
        return float(fc.get_total_flops()), full.model / world
    finally:
        trainer.metrics.close()
        del trainer
        torch.distributed.barrier()


@pytest.mark.parametrize(
    "layout",
    [["parallel.tp=2", "parallel.dp_shard=1"], ["parallel.sp=2", "parallel.dp_shard=1"]],
    ids=["tp2", "sp2"],
)
def test_per_rank_count_is_the_global_count_over_world(layout, tiny_data, tmp_path) -> None:
    overrides = [
        *layout,
        "train.seq_len=32",
        "train.steps=1",
        f"data.path={tiny_data}",
        f"run.dir={tmp_path}",
    ]
    results = run_on_ranks(_count_rank, 2, overrides, timeout_s=120)
    for counted, analytic in results:
        assert abs(analytic - counted) / counted <= 0.02, (analytic, counted)
