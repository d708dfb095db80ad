"""The golden cases, one run of a case through the real entry point, and the comparison.

A case is what a user types: ``python -m train`` or ``torchrun --nproc_per_node=N -m train``
with public overrides only (``train.*``, ``model.*``, ``parallel.*``, ``data.*``, ``run.*``,
``logging.*``), so it survives any refactor behind the entry point. ``{tmp}`` in an override is
the run's scratch folder. Every run is pinned to fp32 on CPU (``parallel.backend=gloo`` keeps a
CUDA box on the CPU too) with one intra-op thread, so the reduction order does not depend on the
machine's core count. The stdlib corpus is prepared afresh under ``{tmp}/data`` (its cache is
keyed by path only, so a shared ``data_cache/`` could hold another ``data.max_bytes``) and its
SHA-256 is stored: a different Python (another stdlib) is reported as such, not as a loss change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.distributed.harness import free_port
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = Path(__file__).resolve().parent
RTOL = 1e-5  # relative, per step; atol 0
ENV = {"OMP_NUM_THREADS": "1"}
COMMON = (
    "parallel.backend=gloo",
    "run.dir={tmp}/run",
    "logging.every=1",
    "logging.progress=false",
    "logging.plot=false",
)
STDLIB = ("data.max_bytes=2000000", "data.path={tmp}/data", "train.eval_batches=1")


@dataclass(frozen=True)
class Case:
    """One golden run: ``nproc`` processes (torchrun when > 1) and the overrides."""

    name: str
    nproc: int
    overrides: tuple[str, ...]
    final_keys: tuple[str, ...]
    """Keys of the last validation record that are compared too."""
    timeout_s: int = 300

    @property
    def command(self) -> list[str]:
        if self.nproc == 1:
            return ["python", "-m", "train"]
        return ["torchrun", f"--nproc_per_node={self.nproc}", "-m", "train"]


CASES = {
    c.name: c
    for c in (
        Case(
            "default",  # what `make train` runs, cut to 12 steps (inside the warm-up)
            1,
            ("train.steps=12", "train.eval_every=0", *STDLIB, *COMMON),
            ("val_loss",),
        ),
        Case(
            "tp2_pp2_dp2",  # tp2 x pp2 interleaved (v=2) x FSDP 2, sequence-parallel norms
            8,
            (
                *("experiment=tp2_pp2_dp2", "train.steps=4", "train.seq_len=32"),
                *("train.eval_every=0", *STDLIB, *COMMON),
            ),
            ("val_loss",),
            timeout_s=600,
        ),
        Case(
            "gpt_moe_ep2",  # GRIN MoE, experts split over the 2 ranks that shard the data
            2,
            (
                *("model=gpt_moe", "parallel.ep=2", "parallel.dp_shard=2", "train.steps=6"),
                *("train.eval_every=0", *STDLIB, *COMMON),
            ),
            ("val_loss",),
        ),
        Case(
            "dmt_synthetic",  # flat-DLRM warm-up, affinity tower plan, DMT on synthetic clicks
            1,
            (
                *("experiment=dmt_synthetic", "train.steps=20"),
                *("model.partition_warmup_steps=50", *COMMON),
            ),
            ("val_auc", "val_ne"),
        ),
    )
}


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def load_golden(name: str) -> dict:
    return json.loads(golden_path(name).read_text())


def argv(case: Case, tmp: Path) -> list[str]:
    """The case's command line with this interpreter, a free rendezvous port and ``{tmp}``."""
    launcher = [sys.executable]
    if case.nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--master_port={free_port()}"]
    return launcher + case.command[1:] + [o.format(tmp=tmp) for o in case.overrides]


def corpus_sha256(data_dir: Path) -> str | None:
    """SHA-256 of the prepared ``train.bin`` + ``val.bin`` (None when the case has no corpus)."""
    if not (data_dir / "meta.json").is_file():
        return None
    h = hashlib.sha256()
    for name in ("train.bin", "val.bin"):
        h.update((data_dir / name).read_bytes())
    return h.hexdigest()


def _wait(proc: subprocess.Popen, timeout_s: int) -> str:
    """Output of ``proc``; on timeout SIGTERM (torchrun forwards it to its workers), then kill."""
    try:
        return proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
        raise RuntimeError(f"timed out after {timeout_s}s:\n{out[-3000:]}") from None


def run_case(case: Case, tmp: Path) -> dict:
    """Run ``case`` in ``tmp``; returns its per-step losses, final metrics and corpus hash."""
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        argv(case, tmp),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = _wait(proc, case.timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{case.name}: exit {proc.returncode}:\n{out[-3000:]}")
    recs = read_metrics(tmp / "run" / "metrics.jsonl")
    train = [r for r in recs if "loss" in r]
    final = [r for r in recs if case.final_keys[0] in r][-1]
    return {
        "steps": [r["step"] for r in train],
        "losses": [r["loss"] for r in train],
        "final": {k: final[k] for k in case.final_keys},
        "corpus_sha256": corpus_sha256(tmp / "data"),
    }


def rel_diffs(want: list[float], got: list[float]) -> list[float]:
    """|got - want| / |want| per element (inf where only one side is non-finite)."""
    out = []
    for w, g in zip(want, got):
        if w == g:
            out.append(0.0)
        elif math.isfinite(w) and math.isfinite(g) and w != 0:
            out.append(abs(g - w) / abs(w))
        else:
            out.append(math.inf)
    return out


def compare(golden: dict, got: dict, rtol: float = RTOL) -> None:
    """Raise AssertionError unless ``got`` reproduces ``golden`` step by step (rel ``rtol``,
    atol 0); the message names the max relative difference and the first differing step."""
    regen = "see docs/testing.md before regenerating (make golden)"
    if golden.get("corpus_sha256") != got.get("corpus_sha256"):
        raise AssertionError(
            f"{golden['case']}: the prepared corpus differs from the golden's (generated with "
            f"Python {golden['python']}, this is {sys.version.split()[0]}): the stdlib or the "
            f"corpus preparation changed, not the training math; {regen}"
        )
    want, have = golden["losses"], got["losses"]
    if got["steps"] != list(range(1, len(want) + 1)):
        raise AssertionError(f"{golden['case']}: logged steps {got['steps']}, want 1..{len(want)}")
    rel = rel_diffs(want, have)
    bad = [i for i, r in enumerate(rel) if r > rtol]
    if bad:
        i = bad[0]
        raise AssertionError(
            f"{golden['case']}: loss differs from the golden at {len(bad)} of {len(want)} steps; "
            f"max rel diff {max(rel):.3e} (rtol {rtol:g}); first at step {i + 1}: "
            f"golden {want[i]!r}, got {have[i]!r}\n  golden {want}\n  got    {have}\n"
            f"(golden generated by {golden['generated_by']}, torch {golden['torch']}); {regen}"
        )
    for k, w in golden["final"].items():
        (r,) = rel_diffs([w], [got["final"][k]])
        if r > rtol:
            raise AssertionError(
                f"{golden['case']}: final {k} golden {w!r}, got {got['final'][k]!r} "
                f"(rel diff {r:.3e}, rtol {rtol:g}); {regen}"
            )
