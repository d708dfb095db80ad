"""Resume never silently changes the model, and finds its checkpoint the way a relaunch needs:
``checkpoint.resume=auto`` (fresh start or newest checkpoint), a step folder, a checkpoints
folder or its ``latest`` file; a model-config change, extra tensors, a damaged ``latest`` and
another run's checkpoints are each refused with one line naming the fix (one process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from checkpoint import CheckpointError, Manager
from checkpoint.format import resolve
from tests.ckpt_utils import args, make, snapshot, train_step

CONFIG = {"model": {"name": "gpt", "n_layers": 6, "n_heads": 8, "n_kv_heads": 4}}


def _save(root: Path, steps=(1, 2), config=CONFIG, **kw) -> tuple[nn.Module, Manager]:
    model, opt = make()
    mgr = Manager(args(root, **kw), root, config=config)
    mgr.attach(model, opt)
    for s in steps:
        train_step(model, opt, s, mgr)
        mgr.save_async(s)
    mgr.finalize()
    return model, mgr


def _resume(root: Path, config=CONFIG, model=None, **kw) -> int:
    model2, opt2 = make(seed=1) if model is None else (model, torch.optim.AdamW(model.parameters()))
    return Manager(args(root, **kw), root, config=config).maybe_resume(model2, opt2)


def test_resume_accepts_step_folder_checkpoints_folder_and_latest_file(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    _save(root)
    step2 = root / "step_00000002"
    for spec in ("latest", str(step2), str(root), str(root / "latest")):
        assert resolve(root, spec) == step2, spec
    assert resolve(root, str(root / "step_00000001")).name == "step_00000001"
    # The path a user types from the Why list: <dir>/checkpoints/latest.
    assert _resume(tmp_path / "elsewhere", resume=str(root / "latest")) == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nowhere", r"no such checkpoint folder or file"),
        ("emptydir", r"holds no checkpoint .*give a step folder"),
        ("afile", r"is a file: give a step folder"),
    ],
)
def test_resume_path_that_is_no_checkpoint_is_refused(tmp_path: Path, spec, message) -> None:
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match=message):
        resolve(tmp_path, str(tmp_path / spec))


def test_auto_starts_fresh_then_resumes_newest(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    assert _resume(root, resume="auto") == 0  # nothing yet: a fresh start, no error
    (root / "step_00000009").mkdir(parents=True)  # a crash during the first save
    assert _resume(root, resume="auto") == 0  # uncommitted folders are not checkpoints
    _save(root, steps=(1, 2, 3), keep_last=0)
    assert _resume(root, resume="auto") == 3
    assert Manager(args(root, enabled=False, resume="auto"), root).resume_target() is None


def test_auto_resume_is_exact(tmp_path: Path) -> None:
    model, mgr = _save(tmp_path, steps=(1, 2))
    model2, opt2 = make(seed=1)
    assert (
        Manager(args(tmp_path, resume="auto"), tmp_path, config=CONFIG).maybe_resume(model2, opt2)
        == 2
    )
    for k, v in snapshot(model, mgr.optimizer).items():
        assert torch.equal(snapshot(model2, opt2)[k], v), k


def test_fresh_start_into_a_folder_with_checkpoints_is_refused(tmp_path: Path) -> None:
    _save(tmp_path)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(step_00000002\)"):
        _resume(tmp_path, resume="none")


@pytest.mark.parametrize(
    ("change", "listed"),
    [
        ({"n_layers": 4}, ["model.n_layers: saved 6, now 4"]),
        (
            {"n_heads": 4, "n_kv_heads": 2},  # same tensor shapes, another head split
            ["model.n_heads: saved 8, now 4", "model.n_kv_heads: saved 4, now 2"],
        ),
    ],
)
def test_model_config_change_is_refused_listing_each_field(tmp_path, change, listed) -> None:
    _save(tmp_path)
    now = {"model": {**CONFIG["model"], **change}}
    model2, opt2 = make(seed=1)
    before = snapshot(model2, opt2)
    with pytest.raises(CheckpointError) as e:
        Manager(args(tmp_path, resume="latest"), tmp_path, config=now).maybe_resume(model2, opt2)
    msg = str(e.value)
    assert all(s in msg for s in listed), msg
    assert f"checkpoint.allow_model_change=[{','.join(change)}]" in msg and "\n" not in msg
    for k, v in snapshot(model2, opt2).items():
        if k.startswith("model/"):
            assert torch.equal(v, before[k]), k  # nothing loaded
    allowed = list(change)
    assert _resume(tmp_path, config=now, resume="latest", allow_model_change=allowed) == 2


def test_checkpoint_tensors_the_model_lacks_are_refused(tmp_path: Path) -> None:
    _save(tmp_path)
    shorter = nn.Sequential(nn.Linear(64, 64))  # the saved model has a second Linear ("2.")
    with pytest.raises(CheckpointError, match=r"holds 8 tensors the current model does not"):
        _resume(tmp_path, model=shorter, resume="latest")


def test_damaged_latest_names_the_newest_valid_earlier_step(tmp_path: Path) -> None:
    _save(tmp_path, steps=(1, 2, 3), keep_last=0)
    shard = tmp_path / "step_00000003" / "shards" / "rank_00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x10
    shard.write_bytes(bytes(data))
    (tmp_path / "step_00000002" / "train_state.json").write_text("{}")  # damaged too
    good = tmp_path / "step_00000001"
    with pytest.raises(CheckpointError) as e:
        _resume(tmp_path, resume="auto")
    msg = str(e.value)
    assert "rank_00000.bin is corrupt" in msg and f"checkpoint.resume={good}" in msg
    assert _resume(tmp_path, resume=str(good)) == 1


def test_latest_naming_no_committed_step_is_refused(tmp_path: Path) -> None:
    _save(tmp_path, steps=(1, 2), keep_last=0)
    (tmp_path / "latest").write_text("step_0000\x00garbage\n")
    with pytest.raises(CheckpointError) as e:
        _resume(tmp_path, resume="auto")
    assert "is not a committed checkpoint" in str(e.value)
    assert f"checkpoint.resume={tmp_path / 'step_00000002'}" in str(e.value)


def test_retention_never_deletes_another_runs_checkpoints(tmp_path: Path) -> None:
    shared, other = tmp_path / "shared", tmp_path / "other"
    _save(shared, steps=(1, 2), keep_last=0)  # run A
    _save(other, steps=(5,))  # run B, elsewhere
    # Run B continues from its step 5 but writes into the folder that holds A's checkpoints.
    model, opt = make(seed=1)
    mgr = Manager(args(shared, resume=str(other / "step_00000005"), keep_last=1), shared)
    assert mgr.maybe_resume(model, opt) == 5
    for s in (6, 7):
        train_step(model, opt, s, mgr)
        mgr.save_async(s)
    mgr.finalize()
    names = sorted(p.name for p in shared.glob("step_*"))
    assert names == ["step_00000001", "step_00000002", "step_00000007"]
    a_index = json.loads((shared / "step_00000002" / "index.json").read_text())
    assert a_index["run_id"] != mgr.run_id
    # ... and never overwrites one of them at the same step.
    train_step(model, opt, 8, mgr)
    with pytest.raises(
        CheckpointError, match=r"step_00000002 is a committed checkpoint of another"
    ):
        mgr.save_async(2)
