"""Loader backends: DALI yields exactly the torch loader's batches (token shards and click
data), resumes mid-epoch on another data-parallel size with the same global samples, and a
missing DALI / apex fails before any process group with the package and the install command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import TokenLoader, TokenShards, write_shards
from train.loaders import DaliRecLoader, DaliTokenLoader, RecLoader
from train.optional import dali_available

ROOT = Path(__file__).resolve().parents[2]
needs_dali = pytest.mark.skipif(
    not dali_available(), reason="needs NVIDIA DALI: the dali extra (make test installs it)"
)

S, G = 16, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> TokenShards:
    """61 samples of 16 tokens: a global batch of 8 crosses an epoch every ~8 steps."""
    out = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    write_shards(out, rng.integers(0, 256, 61 * S + 1), rng.integers(0, 256, 200), 256, "t")
    return TokenShards.open(out, "train")


def _token_steps(loaders: list, steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, every rank's micro-batches in global row order (micro-batch k of rank r is
    rows ``(k*dp + r)*micro ...``, ``train.data.micro_batch_offset``)."""
    out = []
    for _ in range(steps):
        per_rank = [ld.next_batch() for ld in loaders]
        out.append([b[k] for k in range(len(per_rank[0])) for b in per_rank])
    return out


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert len(sa) == len(sb)
        for (x, y), (u, v) in zip(sa, sb):
            assert u.dtype == torch.int64 and torch.equal(x, u) and torch.equal(y, v)


@needs_dali
@pytest.mark.parametrize("dp,micro,shuffle", [(1, 4, True), (2, 2, True), (4, 1, False)])
def test_dali_tokens_equal_torch(shards: TokenShards, dp: int, micro: int, shuffle: bool) -> None:
    steps = 10  # crosses an epoch boundary (61 samples, 8 per step)
    ref = _token_steps(
        [TokenLoader(shards, S, G, micro, r, dp, seed=5, shuffle=shuffle) for r in range(dp)],
        steps,
    )
    dali = [
        DaliTokenLoader(shards, S, G, micro, r, dp, seed=5, shuffle=shuffle, threads=1 + r % 2)
        for r in range(dp)
    ]
    _assert_same(ref, _token_steps(dali, steps))
    for ld in dali:
        ld.close()


@needs_dali
def test_dali_tokens_resume_on_another_dp_size(shards: TokenShards) -> None:
    straight = _token_steps([TokenLoader(shards, S, G, 8, 0, 1, seed=2)], 9)
    before = [DaliTokenLoader(shards, S, G, 2, r, 2, seed=2, prefetch=3) for r in range(2)]
    _token_steps(before, 5)  # DALI has prefetched past step 5; the state must not have
    state = before[0].state_dict()
    assert state == {"consumed_samples": 5 * G, "seed": 2}
    after = [DaliTokenLoader(shards, S, G, 1, r, 4, seed=0) for r in range(4)]
    for ld in after:
        ld.load_state_dict(state)
    resumed = _token_steps(after, 4)
    # same global samples: concatenate each step's micro-batches and compare global batches
    cat = lambda st: torch.cat([x for step in st for x, _ in step])  # noqa: E731
    assert torch.equal(cat(straight[5:]), cat(resumed))
    # an evaluation-style rewind on a live loader rebuilds its pipeline at the new position
    before[1].load_state_dict({"consumed_samples": 0})
    ref = TokenLoader(shards, S, G, 2, 1, 2, seed=2)
    _assert_same([ref.next_batch()], [before[1].next_batch()])


def _rec_steps(loaders: list, steps: int) -> list:
    return [[mb for ld in loaders for mb in ld.next_batch()] for _ in range(steps)]


def _assert_same_rec(a: list, b: list) -> None:
    for sa, sb in zip(a, b, strict=True):
        for p, q in zip(sa, sb, strict=True):
            assert torch.equal(p.dense, q.dense) and torch.equal(p.labels, q.labels)
            assert (p.prob is None and q.prob is None) or torch.equal(p.prob, q.prob)
            assert p.sparse.keys() == q.sparse.keys()
            assert torch.equal(p.sparse.values(), q.sparse.values())
            assert torch.equal(p.sparse.lengths(), q.sparse.lengths())


@pytest.fixture(scope="module", params=["synthetic", "criteo"])
def clicks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from train.recsys_data import CriteoTSV, SyntheticClicks, write_fake_criteo

    if request.param == "synthetic":
        return SyntheticClicks(8, 2, 16, 4, seed=1)
    path = tmp_path_factory.mktemp("criteo") / "day.tsv"
    write_fake_criteo(path, 120, seed=3)  # ~10% empty bags: jagged KJTs
    return CriteoTSV(path, num_embeddings=64)


@needs_dali
def test_dali_clicks_equal_torch_and_resume_on_another_dp_size(clicks) -> None:
    ref = _rec_steps([RecLoader(clicks, "train", 16, 4, r, 2) for r in range(2)], 3)
    dali = [DaliRecLoader(clicks, "train", 16, 4, r, 2, threads=2) for r in range(2)]
    _assert_same_rec(ref, _rec_steps(dali, 3))
    state = dali[0].state_dict()
    assert state == {"consumed_samples": 48}
    after = [DaliRecLoader(clicks, "train", 16, 2, r, 4, threads=1) for r in range(4)]
    for ld in after:
        ld.load_state_dict(state)
    single = RecLoader(clicks, "train", 16, 16)
    single.load_state_dict(state)
    got, want = _rec_steps(after, 3), _rec_steps([single], 3)
    for step_got, step_want in zip(got, want):  # global batch = rank-ordered micro-batches
        dense = torch.cat([mb.dense for mb in step_got])
        assert torch.equal(dense, step_want[0].dense)
        vals = [mb.sparse.to_dict() for mb in step_got]
        for key, whole in step_want[0].sparse.to_dict().items():
            assert torch.equal(torch.cat([v[key].values() for v in vals]), whole.values())
            assert torch.equal(torch.cat([v[key].lengths() for v in vals]), whole.lengths())


def test_dali_click_rows_carry_one_id_per_bag() -> None:
    """The DALI click sample is one id (or -1, an empty bag) per feature; a bag of two ids is
    refused with the fix rather than silently truncated."""
    from torchrec import KeyedJaggedTensor

    from train.loaders import rec_rows
    from train.recsys_data import RecBatch

    def batch(lengths: list[int], values: list[int]) -> RecBatch:
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f0", "f1"], values=torch.tensor(values), lengths=torch.tensor(lengths)
        )
        return RecBatch(torch.zeros(2, 1), kjt, torch.zeros(2), None)

    # key-major lengths: f0 = [1, 0], f1 = [1, 1] -> rows [[7, 8], [-1, 9]]
    _, ids, _, _ = rec_rows(batch([1, 0, 1, 1], [7, 8, 9]))
    assert ids.tolist() == [[7, 8], [-1, 9]]
    with pytest.raises(ValueError, match=r"at most one id per bag.*bags of 2 ids.*backend=torch"):
        rec_rows(batch([1, 0, 2, 0], [1, 2, 3]))


# -- missing optional packages ---------------------------------------------------------------
_HIDE = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "apex" or name.startswith(("apex.", "nvidia.dali")) or name == "nvidia.dali":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
import torch.distributed as dist
def _no_pg(*a, **k):
    raise SystemExit("a process group was started before the check")
dist.init_process_group = _no_pg
from train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "override,needles",
    [
        ("data.backend=dali", ["data.backend=dali", "nvidia-dali-cuda120==2.4.0", ".[dali]"]),
        ("optim.impl=apex_fused_adam", ["optim.impl=apex_fused_adam", "NVIDIA apex", "source"]),
    ],
)
def test_missing_package_fails_before_any_process_group(
    override: str, needles: list[str], tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": "0"}
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            _HIDE,
            override,
            "parallel.dp_shard=2",
            "debug=tiny",
            f"run.dir={tmp_path}",
            f"data.path={tmp_path / 'nodata'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[rank 0] error: "), r.stderr[-2000:]
    for n in needles:
        assert n in err[0]
    assert not (tmp_path / "nodata").exists()  # failed before even preparing data


def test_dali_device_field_errors_name_the_field_and_fix() -> None:
    from train.cli import load_config
    from train.optional import MissingPackageError, check_optional_packages

    cases = [
        (["data.dali_device=tpu"], "data.dali_device='tpu' is unknown: use cpu or gpu"),
        (["data.dali_device=gpu"], "applies to data.backend=dali, not 'torch'"),
    ]
    if dali_available() and not torch.cuda.is_available():
        cases.append(
            (["data.backend=dali", "data.dali_device=gpu"], "needs a CUDA device and none is")
        )
    for overrides, needle in cases:
        job, _ = load_config(overrides)
        with pytest.raises(MissingPackageError, match=re.escape(needle)):
            check_optional_packages(job)


def test_recsys_rejects_dali_gpu_device() -> None:
    from models.errors import ConfigError
    from train.cli import load_config
    from train.trainer import plan_run

    job, _ = load_config(["experiment=dlrm_synthetic", "data.dali_device=gpu"])
    with pytest.raises(ConfigError, match=r"data.dali_device=gpu is not supported .*runs on CPU"):
        plan_run(job)


def test_pypi_apex_is_not_taken_for_nvidia_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``apex`` without ``apex.optimizers.FusedAdam`` (PyPI's) counts as absent."""
    from train import optional

    fake = types.ModuleType("apex")
    fake.__path__ = []  # a package, but no optimizers submodule
    fake.__spec__ = importlib_spec("apex")
    monkeypatch.setitem(sys.modules, "apex", fake)
    assert optional.apex_available() is False


def importlib_spec(name: str):
    import importlib.machinery

    return importlib.machinery.ModuleSpec(name, None, is_package=True)


def test_apex_wiring_with_a_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an apex stand-in present, optim.impl=apex_fused_adam builds its FusedAdam and the
    RMSNorms route through its fused function on their own weights (same outputs)."""
    import torch.nn.functional as F

    from models.gpt import RMSNorm
    from train import kernels, optional
    from train.config import OptimArgs
    from train.trainer import build_optimizer

    calls = []

    class FusedAdam(torch.optim.AdamW):
        def __init__(self, groups, adam_w_mode: bool, **kw) -> None:
            assert adam_w_mode
            super().__init__(groups, **kw)

    def fused_rms_norm_affine(x, weight, shape, eps):
        calls.append(1)
        return F.rms_norm(x, shape, weight, eps)

    mods = {
        "apex": types.ModuleType("apex"),
        "apex.optimizers": types.ModuleType("apex.optimizers"),
        "apex.normalization": types.ModuleType("apex.normalization"),
        "apex.normalization.fused_layer_norm": types.ModuleType("fln"),
    }
    mods["apex.optimizers"].FusedAdam = FusedAdam
    mods["apex.normalization.fused_layer_norm"].fused_rms_norm_affine = fused_rms_norm_affine
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)
    monkeypatch.setattr(optional, "apex_available", lambda: True)
    monkeypatch.setattr(kernels, "apex_available", lambda: True)

    model = torch.nn.Sequential(RMSNorm(8), torch.nn.Linear(8, 8), RMSNorm(8))
    x = torch.randn(3, 8)
    want = model(x)
    assert kernels.apply_fused_rmsnorm(model) == 2
    assert torch.equal(model(x), want) and len(calls) == 2
    assert [n for n, _ in model.named_parameters()] == [
        "0.weight",
        "1.weight",
        "1.bias",
        "2.weight",
    ]
    opt = build_optimizer(model, OptimArgs(impl="apex_fused_adam"))
    assert isinstance(opt, FusedAdam)


@needs_dali
def test_trainer_runs_the_same_on_either_backend(tiny_data: str, tmp_path: Path) -> None:
    """The trainer does not care which backend feeds it: identical losses and weights (the
    validation loader's rewind rebuilds the DALI pipeline mid-run)."""
    from tests.trainer_utils import run_trainer

    common = [f"data.path={tiny_data}", "train.steps=4", "train.eval_every=2"]
    ref = run_trainer([*common, f"run.dir={tmp_path / 't'}", "data.backend=torch"])
    got = run_trainer(
        [*common, f"run.dir={tmp_path / 'd'}", "data.backend=dali", "data.loader_threads=1"]
    )
    assert ref["losses"] == got["losses"] and ref["val_loss"] == got["val_loss"]
    for k, v in ref["weights"].items():
        assert torch.equal(v, got["weights"][k]), k
