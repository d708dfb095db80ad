"""3D parallelism (tensor x pipeline x data) equals the single-process run.

Each layout runs the real ``Trainer`` (``load_config`` overrides -> ``plan_run`` -> ``Trainer.fit``)
inside gloo ranks of the shared harness on a tiny GPT, then gathers the full weights by their
canonical names (``DTensor.full_tensor``; pipeline stages each return their own blocks) and
compares per-step logged losses (rel 1e-5) and final weights (element-wise rel 1e-4, abs 1e-6
for elements near zero) with a single-process run of the same config. Layouts that need the same world size share one spawn to keep start-up cheap.
The vocabulary (257) does not divide tp=2 or tp=4, so padding is exercised everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_on_ranks

# (tp, pp, dp_shard, dp_replicate, schedule, pp_virtual, sequence_parallel_norms, micro_batch)
# Global batch 8; the micro-batch only sets the pipeline's micro-batch count (and the cost).
LAYOUTS_2 = [
    (2, 1, 1, 1, "1f1b", 1, False, 4),
    (1, 2, 1, 1, "1f1b", 1, False, 2),
]
LAYOUTS_8 = [
    (1, 4, 1, 2, "interleaved_1f1b", 2, False, 1),
    (2, 2, 2, 1, "interleaved_1f1b", 2, False, 2),
    (2, 2, 1, 2, "gpipe", 1, False, 2),
    (4, 1, 2, 1, "1f1b", 1, True, 4),
]
VOCAB = 257


def base_overrides(data_dir: str) -> list[str]:
    return [
        "model.dim=32",
        "model.n_layers=8",
        "model.n_heads=8",
        "model.n_kv_heads=4",
        "model.ffn_hidden=64",
        f"model.vocab_size={VOCAB}",
        "train.steps=5",
        "train.global_batch_size=8",
        "train.micro_batch_size=1",
        "train.seq_len=16",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "optim.lr=1e-2",
        "optim.impl=foreach",
        # Adam divides by sqrt(v)+eps: with eps=1e-8 a gradient that is pure rounding noise
        # (|g| ~ 1e-10) moves a weight by ~lr/100 differently per layout; 1e-5 keeps the
        # comparison well-conditioned without hiding real errors (which are O(|g|)).
        "optim.eps=1e-5",
        "data.name=stdlib",
        f"data.path={data_dir}",
        "data.max_bytes=300000",
        "logging.every=1",
        "logging.progress=false",
        "logging.plot=false",
    ]


def layout_overrides(layout: tuple) -> list[str]:
    tp, pp, dps, dpr, sched, v, sp, mb = layout
    return [
        f"train.micro_batch_size={mb}",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.dp_shard={dps}",
        f"parallel.dp_replicate={dpr}",
        f"parallel.pp_schedule={sched}",
        f"parallel.pp_virtual={v}",
        f"parallel.sequence_parallel_norms={str(sp).lower()}",
    ]


def train_and_gather(overrides: list[str], run_dir: str) -> tuple[list[float], dict, float]:
    """Run the real trainer; return (per-step losses on rank 0, full weights of this rank's
    stages on tp/dp coordinate 0, final val loss)."""
    from torch.distributed.tensor import DTensor

    from parallelism.init import canonical_name
    from train.cli import load_config
    from train.metrics import read_metrics
    from train.trainer import Trainer, plan_run

    job, cfg = load_config([*overrides, f"run.dir={run_dir}"])
    plan = plan_run(job)
    trainer = Trainer(job, cfg, plan)
    out = trainer.fit()
    trainer.metrics.close()
    weights = {}
    for name, p in trainer.model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        weights[canonical_name(name)] = full.detach().clone().numpy()  # numpy: safe to pickle
    coord = trainer.dims.coordinate(plan.rank)
    keep = all(coord[k] == 0 for k in ("tp", "dp_shard", "dp_replicate", "sp"))
    losses = []
    if plan.rank == 0:
        losses = [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    return losses, (weights if keep else {}), out["val_loss"]


def _ranks_fn(rank: int, world: int, layouts: list, base: list[str], tmp: str) -> list:
    results = []
    for i, layout in enumerate(layouts):
        results.append(train_and_gather(base + layout_overrides(layout), f"{tmp}/run{world}_{i}"))
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[str], str, tuple]:
    tmp = tmp_path_factory.mktemp("p3d")
    base = base_overrides(str(tmp / "data"))
    ref = train_and_gather(
        [*base, "parallel.dp_shard=1", "train.micro_batch_size=2"], str(tmp / "ref")
    )
    return base, str(tmp), ref


def _check(layout: tuple, per_rank: list, ref: tuple) -> None:
    ref_losses, ref_w, ref_val = ref
    losses, _, val = per_rank[0]
    assert len(losses) == 5, losses
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0, msg=f"{layout}"
    )
    assert abs(val - ref_val) <= 1e-5 * abs(ref_val), (layout, val, ref_val)
    merged: dict = {}
    for _, w, _ in per_rank:
        merged.update(w)
    assert sorted(merged) == sorted(ref_w), (layout, sorted(set(ref_w) ^ set(merged)))
    for name, full in merged.items():
        full, want = torch.from_numpy(full), torch.from_numpy(ref_w[name])
        if full.shape[0] > want.shape[0]:  # vocabulary padding: stays exactly zero
            assert torch.count_nonzero(full[want.shape[0] :]) == 0, (layout, name)
            full = full[: want.shape[0]]
        # element-wise: every weight within 1e-4 relative (atol only for elements near zero)
        torch.testing.assert_close(full, want, rtol=1e-4, atol=1e-6, msg=f"{layout} {name}")
    # the run must actually train (a frozen model would trivially match nothing changes)
    assert ref_losses[-1] < ref_losses[0]


@pytest.mark.distributed
@pytest.mark.slow
def test_3d_layouts_on_2_ranks_equal_single_process(reference) -> None:
    base, tmp, ref = reference
    per_rank = run_on_ranks(_ranks_fn, 2, LAYOUTS_2, base, tmp, timeout_s=90)
    for i, layout in enumerate(LAYOUTS_2):
        _check(layout, [r[i] for r in per_rank], ref)


@pytest.mark.distributed
@pytest.mark.slow
def test_3d_layouts_on_8_ranks_equal_single_process(reference) -> None:
    base, tmp, ref = reference
    per_rank = run_on_ranks(_ranks_fn, 8, LAYOUTS_8, base, tmp, timeout_s=120)
    for i, layout in enumerate(LAYOUTS_8):
        _check(layout, [r[i] for r in per_rank], ref)
