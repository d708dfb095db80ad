"""Run the real Trainer in-process (one rank of a harness run, or a single process) and return
what equality tests compare: per-step losses and the full (unsharded) weights by canonical name."""

from __future__ import annotations

import gc

import torch
from torch.distributed.tensor import DTensor

from parallelism.init import canonical_name

TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_len=16",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "train.eval_batches=1",
    "data.max_bytes=400000",
    "logging.every=1",
    "logging.progress=false",
    "logging.plot=false",
]


def full_state(model: torch.nn.Module, rename=canonical_name) -> dict[str, torch.Tensor]:
    """Unsharded parameters by their plain-model name (``rename``: the family's checkpoint
    adapter's ``logical_name``). Collective for DTensors: call on every rank."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[rename(name)] = (t.full_tensor() if isinstance(t, DTensor) else t).clone()
    return out


def run_trainer(overrides: list[str], base: list[str] | None = None) -> dict:
    """Train with ``base`` (default TINY) + ``overrides``; returns {"losses": [...],
    "weights": {...}, "val_loss", "final": the last record with the final validation}."""
    from train.cli import load_config
    from train.metrics import read_metrics
    from train.trainer import Trainer, plan_run

    job, cfg = load_config((TINY if base is None else base) + overrides)
    trainer = Trainer(job, cfg, plan_run(job))
    try:
        last = trainer.fit()
        adapter = trainer.family.checkpoint_adapter(trainer.model)
        weights = full_state(trainer.model, adapter.logical_name)
        losses = []
        if trainer.is_rank0:
            losses = [r["loss"] for r in read_metrics(trainer.metrics.path) if "loss" in r]
        return {
            "losses": losses,
            "weights": weights,
            "val_loss": last.get("val_loss"),
            "final": last,
        }
    finally:
        trainer.metrics.close()
        # Free the model, optimizer and DDP/FSDP state now, while the process group and the
        # interpreter are alive (they hold reference cycles): collected at interpreter exit
        # instead, their gloo work can abort the rank after its result is in ("terminate
        # called without an active exception", seen once in CI on a ddp2 run).
        del trainer
        gc.collect()


def assert_close_runs(
    ref: dict, got: dict, loss_rtol: float = 1e-5, weight_rtol: float = 1e-4
) -> None:
    """Per-step losses and every final weight of ``got`` equal ``ref``."""
    assert len(ref["losses"]) == len(got["losses"]) > 0
    torch.testing.assert_close(
        torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=loss_rtol, atol=0.0
    )
    assert ref["weights"].keys() == got["weights"].keys()
    for k, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][k], w, rtol=weight_rtol, atol=1e-6, msg=k)


def assert_weights_close(got: torch.Tensor, want: torch.Tensor, name: str, lr: float) -> None:
    """Final weights of a layout equal the reference's: element-wise rel 1e-4 with an absolute
    floor of 0.2% of one AdamW step (``2e-3 * lr``), and rel 1e-4 for the tensor as a whole.

    The floor is AdamW's, not the layout's: gradients agree to fp32 rounding, but the update
    divides by sqrt(v), so an element whose gradient is small next to its rounding difference
    moves by a different fraction of ``lr`` (a few 1e-6 after 3-5 steps at lr 1e-2, on the
    single-process run regrouped into other micro-batches too). A wrong gradient moves an
    element by O(lr) and fails by orders of magnitude."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3 * lr, msg=lambda m: f"{name}: {m}")
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 1e-4, (name, rel)


def assert_runs_close(ref: dict, got: dict, lr: float | None = None) -> None:
    """Per-step losses (rel 1e-5) and every final weight (``assert_weights_close`` at the
    AdamW floor of ``lr``, default ``optim.lr``'s default) of ``got`` equal ``ref``."""
    from train.config import JobConfig

    lr = JobConfig().optim.lr if lr is None else lr
    assert len(ref["losses"]) == len(got["losses"]) > 0
    torch.testing.assert_close(
        torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0.0
    )
    assert got["weights"].keys() == ref["weights"].keys()
    for name, w in ref["weights"].items():
        assert_weights_close(got["weights"][name], w, name, lr)
