"""Offload optimizer: equality with torch.optim.AdamW for every placement, NVMe budget spill,
unusable NVMe paths, skip on non-finite gradients, state_dict round trips, async file I/O."""

from __future__ import annotations

import contextlib
import copy
import itertools
import subprocess
from pathlib import Path

import pytest
import torch

from models.gpt import GPT, GPTConfig
from offload.aio import AsyncFileIO, aligned_empty
from offload.build import interleaved_optimizer, validate_offload_args
from offload.calibrate import calibrate
from offload.kernels import deepspeed_op_ready
from offload.optimizer import InterleavedOptimizer
from offload.perf_model import plan_placement, predict_update_time
from offload.tiers import OffloadConfigError
from parallelism.utils import clip_grad_norm_
from train.config import OffloadArgs

STEPS, CLIP, LR = 20, 0.5, 3e-3


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16))


def adamw_groups(model: torch.nn.Module) -> list[dict]:
    ps = list(model.parameters())
    return [
        {"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0},
    ]


def batch(step: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, 64, (n, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def train_reference(model: torch.nn.Module, steps: int = STEPS) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(adamw_groups(model), lr=LR, betas=(0.9, 0.95))
    for s in range(steps):
        opt.zero_grad()
        loss_fn(model, *batch(s)).backward()
        clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return opt


def train_offload(model: torch.nn.Module, opt: InterleavedOptimizer, steps=range(STEPS)) -> None:
    for s in steps:
        opt.zero_grad()
        loss_fn(model, *batch(s)).backward()
        opt.step()


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> None:
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3e} > {rel} x {scale:.3e}"


def assert_same_as_reference(model, ref, opt=None, ref_opt=None) -> None:
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert not torch.equal(b, tiny_gpt().state_dict()[name]), f"{name} never changed"
        assert_rel_close(a.detach(), b.detach())
    if opt is not None:
        mine, theirs = opt.state_dict()["state"], ref_opt.state_dict()["state"]
        assert mine.keys() == theirs.keys()
        for k in theirs:
            for key in ("exp_avg", "exp_avg_sq"):
                assert_rel_close(mine[k][key], theirs[k][key], 1e-5)
            assert float(mine[k]["step"]) == float(theirs[k]["step"])


def make_opt(model, placement, tmp_path, **kw) -> InterleavedOptimizer:
    return interleaved_optimizer(
        adamw_groups(model),
        lr=LR,
        betas=(0.9, 0.95),
        placement=placement,
        subgroup_size=3000,
        nvme_path=str(tmp_path / "nvme"),
        max_grad_norm=CLIP,
        **kw,
    )


def auto_mix_kwargs(device: str, tmp_path: Path) -> dict:
    """``placement=auto`` arguments whose budgets force a mix: some subgroups resident on the
    device, some in host memory, some on NVMe."""
    return dict(
        calibration=calibrate(
            torch.device(device), str(tmp_path / "nvme"), 1 << 16, cache="", verbose=False
        ),
        device_budget_bytes=100_000,
        host_budget_bytes=250_000,
    )


@pytest.mark.parametrize(
    "placement", ["device", "cpu", "nvme", "stage", "device,stage,cpu,nvme", "auto"]
)
def test_matches_adamw_over_20_steps(placement: str, tmp_path: Path) -> None:
    ref = tiny_gpt()
    ref_opt = train_reference(ref)
    model = tiny_gpt()
    kw = auto_mix_kwargs("cpu", tmp_path) if placement == "auto" else {}
    opt = make_opt(model, placement, tmp_path, **kw)
    assert len(opt.subgroups) >= 4
    if placement == "auto":
        summary = opt.placement_summary()
        assert summary.get("device") and summary.get("nvme"), summary
    train_offload(model, opt)
    assert_same_as_reference(model, ref, opt, ref_opt)


@pytest.mark.skipif(not deepspeed_op_ready("cpu_adam"), reason="DeepSpeed cpu_adam not built")
def test_deepspeed_cpu_adam_kernel_matches(tmp_path: Path) -> None:
    ref = tiny_gpt()
    train_reference(ref)
    model = tiny_gpt()
    opt = make_opt(model, "cpu", tmp_path, cpu_kernel="ds_cpu_adam")
    train_offload(model, opt)
    assert_same_as_reference(model, ref)


@pytest.mark.parametrize("winner", ["torch_fused", "torch_foreach"])
def test_auto_kernel_on_aliased_lists_follows_measurement(
    winner: str, tmp_path: Path, monkeypatch
) -> None:
    """``cpu_kernel=auto``: the in-place (aliased) update uses whichever kernel the list
    measurement found faster, and either choice still equals torch.optim.AdamW."""
    import offload.calibrate as calibrate_mod

    cal = calibrate(torch.device("cpu"), None, 1 << 12, cache="", verbose=False)
    cal.cpu_kernel_params_per_s = {"torch_fused": 1.0, "torch_foreach": 2.0}
    seen: list[list[int]] = []

    def fake_rank(kernels, sizes, repeats=7):
        seen.append(sizes)
        return {k: (2.0 if k == winner else 1.0) for k in kernels}

    monkeypatch.setattr(calibrate_mod, "rank_list_kernels", fake_rank)
    ref = tiny_gpt()
    train_reference(ref)
    model = tiny_gpt()
    opt = make_opt(model, "cpu", tmp_path, cpu_kernel="auto", calibration=cal)
    assert opt.cpu_kernel_name == "torch_foreach"
    assert opt.cpu_list_kernel_name == winner
    biggest = max(opt.subgroups, key=lambda sg: sg.numel)
    assert seen == [[p.numel() for p in biggest.params]]
    train_offload(model, opt)
    assert_same_as_reference(model, ref)


def test_state_dict_roundtrip_across_tiers(tmp_path: Path) -> None:
    """10 steps with state on NVMe, save, restore into a CPU-placed optimizer, 10 more steps:
    equals 20 uninterrupted AdamW steps; the state dict also loads into torch.optim.AdamW."""
    ref = tiny_gpt()
    train_reference(ref)
    model = tiny_gpt()
    opt = make_opt(model, "nvme", tmp_path)
    train_offload(model, opt, range(10))
    sd = copy.deepcopy(opt.state_dict())
    plain = torch.optim.AdamW(adamw_groups(tiny_gpt()), lr=LR)
    plain.load_state_dict(sd)  # torch's own format
    opt2 = make_opt(model, "device,cpu", tmp_path)
    opt2.load_state_dict(sd)
    train_offload(model, opt2, range(10, 20))
    assert_same_as_reference(model, ref)


def test_nonfinite_gradient_skips_whole_step(tmp_path: Path) -> None:
    model = tiny_gpt()
    opt = make_opt(model, "device,cpu,nvme", tmp_path)
    train_offload(model, opt, range(2))
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    loss_fn(model, *batch(3)).backward()
    last = list(model.parameters())[-1]
    last.grad[0, 0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1 and opt.step_count == 2
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    for k, s in opt.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], state_before[k]["exp_avg"])


def test_host_budget_smaller_than_state_trains_through_nvme(tmp_path: Path) -> None:
    ref = tiny_gpt()
    train_reference(ref)
    model = tiny_gpt()
    state_bytes = 12 * sum(p.numel() for p in model.parameters())
    opt = make_opt(model, "cpu", tmp_path, host_budget_bytes=state_bytes // 2)
    summary = opt.placement_summary()
    assert summary.get("nvme", 0) >= 1 and summary.get("cpu", 0) >= 1, summary
    assert list((tmp_path / "nvme" / "rank00000").glob("subgroup_*.bin"))
    train_offload(model, opt)
    assert_same_as_reference(model, ref)


def test_host_budget_without_nvme_path_is_a_clear_error() -> None:
    with pytest.raises(OffloadConfigError, match=r"offload.host_budget_mb=.*offload.nvme_path"):
        interleaved_optimizer(tiny_gpt().parameters(), placement="cpu", host_budget_bytes=1 << 10)


def test_unwritable_nvme_path_fails_before_first_step(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = OffloadArgs(kind="nvme", nvme_path=str(blocker / "nvme"))
    with pytest.raises(OffloadConfigError, match=r"offload.nvme_path=.*not writable"):
        validate_offload_args(args)
    model = tiny_gpt()
    with pytest.raises(OffloadConfigError, match=r"offload\.nvme_path"):
        interleaved_optimizer(model.parameters(), placement="nvme", nvme_path=args.nvme_path)


def test_read_only_mount_is_rejected(tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with pytest.raises(OffloadConfigError, match=r"offload.nvme_path=.*not writable"):
            validate_offload_args(OffloadArgs(kind="nvme", nvme_path=str(mnt / "x")))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_fails_before_first_step(tmp_path: Path, monkeypatch) -> None:
    """Free space is checked against the bytes the NVMe tier needs before anything changes."""
    import offload.tiers as tiers

    real = tiers.shutil.disk_usage
    monkeypatch.setattr(tiers.shutil, "disk_usage", lambda p: real(p)._replace(free=64 << 10))
    model = tiny_gpt()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(OffloadConfigError, match=r"offload.nvme_path=.*MiB free but"):
        make_opt(model, "nvme", tmp_path)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_full_tmpfs_fails_before_first_step(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tiny tmpfs here (needs root)")
    try:
        with pytest.raises(OffloadConfigError, match=r"offload\.nvme_path"):
            interleaved_optimizer(tiny_gpt().parameters(), placement="nvme", nvme_path=str(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("backend", ["threads", "buffered", "deepspeed"])
def test_async_io_roundtrip(backend: str, tmp_path: Path) -> None:
    if backend == "deepspeed" and not deepspeed_op_ready("async_io"):
        pytest.skip("DeepSpeed async_io not built")
    io = AsyncFileIO(tmp_path, backend)
    if backend == "threads" and not io.direct:
        pytest.skip("no O_DIRECT on this filesystem")
    src = aligned_empty(3 << 20).copy_(torch.randn(3 << 20))
    dst = aligned_empty(3 << 20).zero_()
    io.write(src, tmp_path / "f.bin", 4096).wait()
    io.read(dst, tmp_path / "f.bin", 4096).wait()
    io.close()
    assert torch.equal(src, dst) and io.backend == backend


def test_buffered_fallback_without_o_direct(tmp_path: Path, monkeypatch) -> None:
    """Filesystems that reject O_DIRECT (EINVAL: older tmpfs, overlayfs) get the buffered pool."""
    import offload.aio as aio

    monkeypatch.setattr(aio, "probe_direct_io", lambda folder: False)
    io = AsyncFileIO(tmp_path)
    assert io.backend == "buffered" and not io.direct
    src = aligned_empty(1 << 16).copy_(torch.randn(1 << 16))
    dst = aligned_empty(1 << 16).zero_()
    io.write(src, tmp_path / "b.bin").wait()
    io.read(dst, tmp_path / "b.bin").wait()
    io.close()
    assert torch.equal(src, dst)


def test_perf_model_respects_budgets_and_prefers_faster_placement() -> None:
    from offload.calibrate import Calibration

    cal = Calibration(
        h2d_bps=20e9,
        d2h_bps=20e9,
        dev_s_per_param=1e-10,
        cpu_s_per_param=4e-9,
        cpu_s_per_param_io=5e-9,
        nvme_read_bps=2e9,
        nvme_write_bps=1e9,
        nvme_read_bps_cpu=2e9,
        nvme_write_bps_cpu=1e9,
    )
    n = [1 << 20] * 8
    plan = plan_placement(n, cal, 2 * 12 * (1 << 20), 3 * 12 * (1 << 20) + (1 << 26), True, False)
    assert plan[:2] == ["device", "device"] and "nvme" in plan
    t = {p: predict_update_time(n, [p] * 8, cal, False) for p in ("device", "cpu", "nvme")}
    assert t["device"] < t["cpu"] < t["nvme"]
    # on a GPU, staging some host subgroups through the device beats all-CPU
    assert "stage" in plan_placement(n, cal, 0, 0, False, False)


@pytest.mark.parametrize("duplex, transfers", [(1.0, 8), (2.0, 5), (1.5, 6.5)])
def test_perf_model_nvme_pipeline_follows_the_disks_duplex(duplex: float, transfers) -> None:
    """4 NVMe subgroups, free CPU updates, equal read and write speed, T = one transfer: a
    half-duplex disk (one queue) serves 4 reads + 4 writes in turn (8 T); with independent
    queues the first read, then read k+1 alongside write k, then the last write (5 T)."""
    from offload.calibrate import Calibration
    from offload.tiers import padded

    bw = 1e9
    cal = Calibration(
        cpu_s_per_param=1e-15,
        cpu_s_per_param_io=1e-15,
        nvme_read_bps=bw,
        nvme_write_bps=bw,
        nvme_read_bps_cpu=bw,
        nvme_write_bps_cpu=bw,
        nvme_duplex=duplex,
    )
    n = [1 << 20] * 4
    t = 12 * padded(n[0]) / bw
    got = predict_update_time(n, ["nvme"] * 4, cal, True)
    assert got == pytest.approx(transfers * t, rel=1e-6)


def test_cpu_placement_updates_host_params_in_place(tmp_path: Path) -> None:
    """On a CPU-resident model, ``cpu`` subgroups own the parameters' storage (no copy back);
    other placements keep the parameters' own storage."""
    model = tiny_gpt()
    opt = make_opt(model, "cpu,device", tmp_path)
    for sg in opt.subgroups:
        ptrs = {p.data_ptr() for p in sg.params}
        inside = {
            sg.state[0, off].data_ptr() == p.data_ptr() for p, off in zip(sg.params, sg.offsets)
        }
        assert inside == {sg.placement == "cpu"}, (sg.placement, ptrs)
        assert bool(sg.extra.get("aliased")) == (sg.placement == "cpu")


def _resident_bytes(addr: int) -> int:
    """Rss of the mapping of this process that contains ``addr`` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
def test_aligned_empty_is_aligned_and_resident() -> None:
    """Unpinned staging buffers are page-aligned and populated when allocated (by one thread,
    in address order: DMA then sees few, large physically contiguous runs)."""
    for numel, dtype in [(1, torch.float32), (5, torch.bfloat16), (3 << 20, torch.float32)]:
        t = aligned_empty(numel, dtype, pin=False)
        assert t.shape == (numel,) and t.dtype == dtype and t.data_ptr() % 4096 == 0
    big = aligned_empty(8 << 20, pin=False)  # 32 MiB, never written by the test
    assert _resident_bytes(big.data_ptr()) >= 32 << 20
    assert aligned_empty(0, pin=False).numel() == 0


@pytest.mark.parametrize("backend", ["threads", "deepspeed"])
def test_io_empty_buffers_transfer_directly(backend: str, tmp_path: Path) -> None:
    """``AsyncFileIO.empty`` hands DeepSpeed buffers it DMAs into without its bounce copy."""
    if backend == "deepspeed" and not deepspeed_op_ready("async_io"):
        pytest.skip("DeepSpeed async_io not built")
    io = AsyncFileIO(tmp_path, backend)
    if not io.direct:
        pytest.skip("no O_DIRECT on this filesystem")
    src, dst = io.empty(1 << 20), io.empty(1 << 20)
    assert src.data_ptr() % 4096 == 0 and dst.data_ptr() % 4096 == 0
    if backend == "deepspeed" and not torch.cuda.is_available():
        handle = io._ds_acquire()
        assert handle.is_pinned(src) and handle.is_pinned(dst[4096:])
        io._ds_release(handle)
    src.copy_(torch.randn(1 << 20))
    dst.zero_()
    io.write(src, tmp_path / "e.bin", 8192).wait()
    io.read(dst, tmp_path / "e.bin", 8192).wait()
    assert torch.equal(src, dst)
    io.free(src)
    del src, dst
    io.close()
    io.close()
    assert not io._locked


def _physical_runs(t: torch.Tensor) -> int:
    """Physically contiguous runs of 4 KiB pages behind ``t`` (0 when PFNs are hidden)."""
    import struct

    page, addr = 4096, t.data_ptr()
    pages = t.numel() * t.element_size() // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // page * 8)
        raw = f.read(pages * 8)
    pfns = [struct.unpack_from("<Q", raw, 8 * i)[0] & ((1 << 55) - 1) for i in range(pages)]
    if not any(pfns):
        return 0
    return 1 + sum(1 for a, b in itertools.pairwise(pfns) if b != a + 1)


def _vmstat(key: str) -> int:
    """A counter from /proc/vmstat (0 when absent)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/vmstat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def _thp_enabled() -> bool:
    p = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return p.exists() and "[never]" not in p.read_text()


@pytest.mark.skipif(not _thp_enabled(), reason="transparent huge pages disabled")
@pytest.mark.parametrize("backend", ["threads", "deepspeed"])
def test_staging_buffers_are_physically_contiguous(backend: str, tmp_path: Path) -> None:
    """O_DIRECT DMAs into the buffer's pages: scattered 4 KiB pages cost ~25% of read
    bandwidth on the development machine's virtio disk, so staging buffers sit on huge pages
    (32 MiB should be ~16 runs; a torch tensor filled by OpenMP threads has thousands)."""
    if backend == "deepspeed" and not deepspeed_op_ready("async_io"):
        pytest.skip("DeepSpeed async_io not built")
    io = AsyncFileIO(tmp_path, backend)
    if io.backend != backend:
        pytest.skip(f"no O_DIRECT here ({io.backend})")
    before = _vmstat("thp_fault_fallback")
    bufs = [io.empty(8 << 20) for _ in range(2)]
    runs = [_physical_runs(b) for b in bufs]
    if not all(runs):
        pytest.skip("page frame numbers are hidden (needs CAP_SYS_ADMIN)")
    if any(r > 64 for r in runs):
        # Huge pages are the kernel's to give: skip only when it said it had none (the request
        # was made and refused), so a buffer that never asked for them still fails.
        refused = io.collapse_errors if backend == "deepspeed" else []
        fallbacks = _vmstat("thp_fault_fallback") - before
        if refused or (backend == "threads" and fallbacks > 0):
            pytest.skip(
                f"host memory too fragmented for huge pages now (runs {runs}; MADV_COLLAPSE "
                f"errnos {refused}, thp_fault_fallback +{fallbacks})"
            )
    assert all(r <= 64 for r in runs), runs  # >= 512 KiB per run on average
    del bufs
    io.close()
