"""Import parity with transformers: the Lattice side (one rank of any layout, or one process)
and the reference side (the same step in ``LlamaForCausalLM`` with ``torch.optim.AdamW``).

``lattice_side`` runs the real Trainer with ``model.from_hf``: the logits of a fixed batch before
training (through the pipeline schedule when pp > 1), then ``train.steps`` steps, recording the
first step's global batch, its clipped gradients and the weights right after it (full tensors,
by Lattice name). ``hf_step`` does that step in transformers: mean next-token loss over the same
global batch, ``clip_grad_norm_``, AdamW with Lattice's groups (decay on matrices only) and the
same hyper-parameters. ``to_lattice`` renames HF tensors and puts q/k rows in Lattice's order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

# AdamW's eps is raised from 1e-8 so a gradient that is pure rounding noise (|g| ~ 1e-10) cannot
# move a weight by a visible fraction of lr differently in the two libraries (as tests/distributed
# /test_3d.py); real errors are O(|g|) and still fail by orders of magnitude.
STEP = [
    "train.warmup_steps=1",
    "optim.lr=1e-2",
    "optim.eps=1e-5",
    "optim.impl=foreach",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_len=16",
    "train.eval_every=0",
    "train.eval_batches=1",
    "logging.every=1",
    "logging.progress=false",
    "logging.plot=false",
]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _layout_logits(trainer: Any, x: torch.Tensor) -> torch.Tensor | None:
    """Logits of ``x`` (this rank's per-step rows) on the trainer's layout; None on a pipeline
    rank that holds no last stage."""
    fam, model = trainer.family, trainer.model
    model.eval()
    try:
        if fam.pipeline is None:
            with torch.no_grad(), fam._context():
                return _full(model(x))
        captured: list[torch.Tensor] = []
        loss = fam.loss

        def capture(out: torch.Tensor, y: torch.Tensor, vocab: int) -> torch.Tensor:
            captured.append(_full(out))
            return loss(out, y, vocab)

        fam.loss = capture
        n = trainer.job.train.micro_batch_size
        micro = [(x[i : i + n], torch.zeros_like(x[i : i + n])) for i in range(0, len(x), n)]
        with torch.no_grad(), fam._context():
            fam._run_pipeline(micro, train=False)
        del fam.loss  # back to the class's method
        return torch.cat(captured) if captured else None
    finally:
        model.train()


def lattice_side(overrides: list[str], x: torch.Tensor) -> dict:
    """Run the Trainer (``STEP`` + ``overrides``); see the module docstring. Collective."""
    from parallelism.init import canonical_name
    from train.cli import load_config
    from train.metrics import read_metrics
    from train.trainer import Trainer, plan_run

    job, cfg = load_config([*STEP, *overrides])
    plan = plan_run(job)
    trainer = Trainer(job, cfg, plan)
    try:
        logits = _layout_logits(trainer, x)
        rec: dict[str, Any] = {"batch": [], "grads": {}, "weights": {}}
        next_batch, step = trainer.train_loader.next_batch, trainer.optimizer.step

        def recording_batch():
            batch = next_batch()
            if not rec["batch"]:
                rec["batch"] = [(bx.clone(), by.clone()) for bx, by in batch]
            return batch

        def recording_step(*args, **kwargs):
            first = not rec["grads"]
            if first:
                for n, p in trainer.model.named_parameters():
                    rec["grads"][canonical_name(n)] = _full(p.grad)
            out = step(*args, **kwargs)
            if first:
                for n, p in trainer.model.named_parameters():
                    rec["weights"][canonical_name(n)] = _full(p)
            return out

        trainer.train_loader.next_batch = recording_batch
        trainer.optimizer.step = recording_step
        trainer.fit()
        final_logits = _layout_logits(trainer, x)
        losses = []
        if trainer.is_rank0:
            records = read_metrics(Path(job.run.dir) / "metrics.jsonl")
            losses = [r["loss"] for r in records if "loss" in r]
        coord = trainer.dims.coordinate(plan.rank)
        return {
            "coord": coord,
            "logits": logits,
            "final_logits": final_logits,
            "losses": losses,
            "bytes_read": trainer.family.hf_bytes_read,
            "shard_bytes": shard_bytes(trainer.model, job.model.vocab_size),
            **rec,
        }
    finally:
        trainer.close()


def shard_bytes(model: torch.nn.Module, vocab: int) -> int:
    """fp32 bytes of this rank's local parameters, vocabulary padding rows left out: what an
    import that reads only its own shard reads."""
    from parallelism.init import canonical_name, local_index

    total = 0
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        n = local.numel()
        if canonical_name(name) in ("tok_embeddings.weight", "output.weight"):
            rows = local_index(p)[0]
            n -= int((rows >= vocab).sum()) * (n // max(1, rows.numel()))
        total += n * 4
    return total


def to_lattice(hf_tensors: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """HF-named tensors (weights or gradients) -> Lattice names and RoPE row order."""
    from checkpoint.hf_arch import model_kwargs
    from checkpoint.hf_llama import rename, to_lattice_tensor

    kw = model_kwargs(config.to_dict() if hasattr(config, "to_dict") else config)
    out = {}
    for name, t in hf_tensors.items():
        new = rename(name)
        if new is not None:
            out[new] = to_lattice_tensor(new, t, kw)
    return out


def hf_step(hf: Any, batch: list[tuple[torch.Tensor, torch.Tensor]], job_optim: Any) -> dict:
    """One training step of ``hf`` (``LlamaForCausalLM``) on the global ``batch`` with torch
    AdamW as Lattice configures it (``job_optim``: the run's ``OptimArgs``)."""
    x = torch.cat([b[0] for b in batch])
    y = torch.cat([b[1] for b in batch])
    params = dict(hf.named_parameters())
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": job_optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=job_optim.lr,
        betas=(job_optim.beta1, job_optim.beta2),
        eps=job_optim.eps,
        foreach=False,
    )
    hf.train()
    logits = hf(x).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), job_optim.grad_clip)
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    opt.step()
    weights = {n: p.detach().clone() for n, p in params.items()}
    return {
        "loss": loss.item(),
        "grads": to_lattice(grads, hf.config),
        "weights": to_lattice(weights, hf.config),
    }


def unpad(got: torch.Tensor, want: torch.Tensor, what: str) -> torch.Tensor:
    """Drop vocabulary padding rows (which must be exactly zero)."""
    if got.shape[0] > want.shape[0]:
        assert torch.count_nonzero(got[want.shape[0] :]) == 0, what
        got = got[: want.shape[0]]
    return got


def assert_step_equal(got: dict, want: dict, what: str) -> None:
    """First-step gradients (rel 1e-5, abs 1e-5 of the tensor's largest gradient) and updated
    weights (rel 1e-5, abs 1e-5; one AdamW step moves a weight by ~lr = 1e-2, and on one
    process the two libraries differ by 4e-7), every tensor present on both sides."""
    for kind in ("grads", "weights"):
        assert sorted(got[kind]) == sorted(want[kind]), (what, kind)
        for name, w in want[kind].items():
            g = unpad(got[kind][name], w, f"{what} {kind} {name}")
            atol = 1e-5 * w.abs().max().item() if kind == "grads" else 1e-5
            torch.testing.assert_close(
                g, w, rtol=1e-5, atol=atol, msg=lambda m, n=name, k=kind: f"{what} {k} {n}: {m}"
            )
