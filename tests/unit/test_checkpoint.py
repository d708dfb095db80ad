"""Checkpoint format, integrity, full disk, and the lazy snapshot's bit-exactness (one process)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from checkpoint import CheckpointError, Manager, validate_checkpoint_args
from checkpoint.consolidate import load_consolidated
from checkpoint.engine import HostRing
from checkpoint.format import read_index, resolve
from tests.ckpt_utils import FaultInjectingWriter, args, make, snapshot, train_step


def _saved(tmp_path: Path, steps=(1,), mode="sync", **kw):
    model, opt = make()
    mgr = Manager(args(tmp_path, mode, **kw), tmp_path)
    mgr.attach(model, opt)
    for s in steps:
        train_step(model, opt, s, mgr)
        mgr.save_async(s)
    mgr.finalize()
    return model, opt, mgr


def test_index_roundtrip_and_latest(tmp_path: Path) -> None:
    model, opt, _ = _saved(tmp_path, steps=(1, 2, 3), keep_last=2)
    assert resolve(tmp_path, "latest").name == "step_00000003"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    index = read_index(tmp_path / "step_00000003")
    meta = index["tensors"]["model/0.weight"]
    assert meta["logical_shape"] == [64, 64] and meta["dtype"] == "float32"
    assert set(meta["partitioning"]) >= {"placements", "mesh_dims", "padding", "expert", "fused"}
    assert all(len(m["sha256"]) == 64 for m in index["manifest"].values())
    got = load_consolidated(tmp_path / "step_00000003")
    for k, v in snapshot(model, opt).items():
        assert torch.equal(got[k], v), k


def test_resume_restores_model_and_optimizer(tmp_path: Path) -> None:
    model, opt, _ = _saved(tmp_path, steps=(1, 2))
    model2, opt2 = make(seed=1)  # different init: everything must come from the checkpoint
    mgr2 = Manager(args(tmp_path, resume="latest"), tmp_path)
    assert mgr2.maybe_resume(model2, opt2) == 2
    train_step(model, opt, 3)
    train_step(model2, opt2, 3)
    ref, got = snapshot(model, opt), snapshot(model2, opt2)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_vocab_padding_dropped_on_save_and_repadded_on_load(tmp_path: Path) -> None:
    """The family's adapter declares the padding (the checkpoint never inspects the model)."""
    from torch import nn

    from checkpoint.adapter import CheckpointAdapter

    class Padded(nn.Module):
        def __init__(self, rows: int) -> None:
            super().__init__()
            self.output = nn.Linear(4, rows, bias=False)

    adapter = CheckpointAdapter(padding={"output.weight": (0, 10)})

    m = Padded(12)
    with torch.no_grad():
        m.output.weight.copy_(torch.arange(48.0).reshape(12, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    mgr = Manager(args(tmp_path), tmp_path)
    mgr.attach(m, opt, adapter=adapter)
    mgr.save_async(1)
    meta = read_index(tmp_path / "step_00000001")["tensors"]["model/output.weight"]
    assert meta["logical_shape"] == [10, 4]
    assert meta["partitioning"]["padding"] == {"dim": 0, "padded_size": 12}
    m2 = Padded(16)  # e.g. a tensor-parallel degree that pads further
    mgr2 = Manager(args(tmp_path, resume="latest"), tmp_path)
    mgr2.maybe_resume(m2, torch.optim.SGD(m2.parameters(), lr=0.1), adapter=adapter)
    assert torch.equal(m2.output.weight[:10], m.output.weight[:10])
    assert torch.equal(m2.output.weight[10:], torch.zeros(6, 4))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_refused_never_half_loaded(tmp_path: Path, damage: str) -> None:
    _saved(tmp_path, steps=(1,))
    shard = tmp_path / "step_00000001" / "shards" / "rank_00000.bin"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 3] ^= 0x01
        shard.write_bytes(bytes(data))
    model2, opt2 = make(seed=1)
    before = snapshot(model2, opt2)
    mgr = Manager(args(tmp_path, resume="latest"), tmp_path)
    with pytest.raises(CheckpointError, match=r"rank_00000\.bin"):
        mgr.maybe_resume(model2, opt2)
    for k, v in snapshot(model2, opt2).items():  # untouched
        if k.startswith("model/"):
            assert torch.equal(v, before[k]), k
    with pytest.raises(CheckpointError, match=r"rank_00000\.bin"):
        load_consolidated(tmp_path / "step_00000001")


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    return (
        shutil.which("mount") is not None
        and subprocess.run(cmd, capture_output=True).returncode == 0
    )


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_full_disk_fails_clearly_and_keeps_previous(tmp_path: Path, disk: str) -> None:
    root = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mounted = disk == "tmpfs" and _tmpfs(root, "256k")
    if disk == "tmpfs" and not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected case covers it")
    try:
        model, opt, mgr = _saved(root, steps=(1,))
        good = snapshot(model, opt)
        if mounted:  # a real full filesystem: leave less room than one checkpoint needs
            free = shutil.disk_usage(root).free
            (root / "filler").write_bytes(bytes(max(0, free - 8192)))
        else:  # the injected writer raises ENOSPC as a full disk would
            mgr.engine.writer = FaultInjectingWriter(enospc_after_bytes=4096)
        train_step(model, opt, 2)
        with pytest.raises(CheckpointError, match=r"No space left on device") as exc:
            mgr.save_async(2)
        assert "step 1" in str(exc.value) and "previous checkpoint" in str(exc.value)
        assert resolve(root, "latest").name == "step_00000001"
        assert not (root / "step_00000002" / "index.json").exists()
        got = load_consolidated(root / "step_00000001")
        for k, v in good.items():
            assert torch.equal(got[k], v), k
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=False)


def _lazy_save_during_next_step(
    tmp_path: Path, guard: bool, width: int, host_buffer_mb: int
) -> tuple[dict, dict, object]:
    model, opt = make(width=width)
    mgr = Manager(args(tmp_path, "lazy_async", host_buffer_mb=host_buffer_mb), tmp_path)
    mgr.attach(model, opt)
    mgr.engine.writer = FaultInjectingWriter(copy_delay_s=0.02)  # copies slower than a step
    train_step(model, opt, 1)
    ref = snapshot(model, opt)  # synchronous snapshot at step 1
    mgr.save_async(1)
    job = mgr.job
    assert not job.copy_done.is_set()  # lazy: nothing copied yet at return
    train_step(model, opt, 2, mgr if guard else None)  # the next step's update
    mgr.finalize()
    return ref, load_consolidated(tmp_path / "step_00000001"), job


@pytest.mark.parametrize(
    ("width", "host_buffer_mb"), [(128, 1024), (1024, 1)], ids=["state_fits", "state_12x_budget"]
)
def test_lazy_snapshot_equals_sync_snapshot(
    tmp_path: Path, width: int, host_buffer_mb: int
) -> None:
    """The update waits until the snapshot is on the host (streamed through the arena when the
    state is larger than the budget), and the file equals a synchronous snapshot bit for bit."""
    ref, got, job = _lazy_save_during_next_step(tmp_path / "guarded", True, width, host_buffer_mb)
    assert job.copy_s > 0.02  # the copy really was still running when the update came
    if host_buffer_mb == 1:
        assert job.file_bytes > 12 * (1 << 20)  # streamed through a 1 MiB arena
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    # Control: without wait_before_update the update leaks into the copy, and this test sees it.
    ref, got, _ = _lazy_save_during_next_step(tmp_path / "unguarded", False, width, host_buffer_mb)
    assert any(not torch.equal(got[k], ref[k]) for k in ref)


def test_host_ring_streams_state_larger_than_budget(tmp_path: Path) -> None:
    model, opt, _ = _saved(tmp_path, steps=(1,), mode="lazy_async", host_buffer_mb=1)
    ring = HostRing(100, pin=False)
    a, b = ring.alloc(60), ring.alloc(40)
    assert (a, b) == (0, 60)
    ring.free()
    assert ring.alloc(50) == 0  # wraps into the freed head
    got = load_consolidated(tmp_path / "step_00000001")
    for k, v in snapshot(model, opt).items():
        assert torch.equal(got[k], v), k


def test_bad_mode_rejected() -> None:
    from train.config import CheckpointArgs

    with pytest.raises(CheckpointError, match=r"checkpoint\.mode='fast'.*lazy_async"):
        validate_checkpoint_args(CheckpointArgs(mode="fast"))


@pytest.mark.parametrize("mode", ["lazy_async", "async"])
def test_finalize_leaves_no_engine_thread_running(tmp_path: Path, mode: str) -> None:
    """A daemon thread still inside torch C++ code at interpreter exit aborts the process
    ("terminate called without an active exception"): finalize joins them all."""
    import threading

    _, _, mgr = _saved(tmp_path, steps=(1, 2), mode=mode)
    left = [t.name for t in threading.enumerate() if t.name.startswith("ckpt-")]
    assert left == []
    assert mgr.engine._threads == []  # joined, not merely finished by chance
