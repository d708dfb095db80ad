"""``python -m checkpoint.inspect --verify``: every damaged file is named, the exit status says
damaged (1) or clean (0), and the newest earlier step that verifies is offered (one process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checkpoint import Manager
from checkpoint.inspect import main
from tests.ckpt_utils import args, make, train_step

SHARD = "shards/rank_00000.bin"
STATE = "train_state.json"


def _save(root: Path, steps: tuple[int, ...] = (1,)) -> Path:
    """A real checkpoint folder (sync mode, no process group) holding every step of ``steps``."""
    model, opt = make()
    mgr = Manager(args(root, keep_last=0), root)
    mgr.attach(model, opt)
    for s in steps:
        train_step(model, opt, s, mgr)
        mgr.save_async(s)
    mgr.finalize()
    return root / f"step_{steps[-1]:08d}"


def _verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["--verify", str(path)])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def _flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _manifest(step: Path) -> dict:
    return json.loads((step / "index.json").read_text())["manifest"]


def test_clean_checkpoint_verifies_ok(tmp_path: Path, capsys) -> None:
    step = _save(tmp_path)
    manifest = _manifest(step)
    nbytes = sum(m["bytes"] for m in manifest.values())
    rc, out = _verify(tmp_path, capsys)  # the checkpoints folder: its latest step
    assert rc == 0, out
    assert f"{step}: verified {len(manifest)} files, {nbytes} bytes: ok" in out
    assert "damaged" not in out


def test_flipped_byte_is_a_sha256_mismatch(tmp_path: Path, capsys) -> None:
    step = _save(tmp_path)
    _flip(step / SHARD)
    rc, out = _verify(step, capsys)
    assert rc == 1, out
    bad = [line for line in out.splitlines() if line.startswith("damaged:")]
    assert len(bad) == 1 and f"{step / SHARD} is corrupt: sha256" in bad[0], out
    assert f"{step}: 1 of {len(_manifest(step))} files damaged" in out


def test_truncated_file_names_both_sizes(tmp_path: Path, capsys) -> None:
    step = _save(tmp_path)
    size = (step / SHARD).stat().st_size
    (step / SHARD).write_bytes((step / SHARD).read_bytes()[: size // 2])
    rc, out = _verify(step, capsys)
    assert rc == 1, out
    assert f"{step / SHARD} is truncated or padded: {size // 2} bytes, manifest says {size}" in out


def test_missing_file(tmp_path: Path, capsys) -> None:
    step = _save(tmp_path)
    (step / STATE).unlink()
    rc, out = _verify(step, capsys)
    assert rc == 1, out
    assert f"{step / STATE} is missing" in out


def test_every_damaged_file_is_named_not_only_the_first(tmp_path: Path, capsys) -> None:
    step = _save(tmp_path)
    _flip(step / SHARD)
    (step / STATE).write_text("{}")
    rc, out = _verify(step, capsys)
    assert rc == 1, out
    bad = [line for line in out.splitlines() if line.startswith("damaged:")]
    assert len(bad) == 2, out
    assert any(f"{step / SHARD} is corrupt: sha256" in line for line in bad), out
    assert any(f"{step / STATE} is truncated or padded: 2 bytes" in line for line in bad), out
    assert f"{step}: 2 of {len(_manifest(step))} files damaged" in out


def test_train_state_missing_from_manifest_is_damage(tmp_path: Path, capsys) -> None:
    step = _save(tmp_path)
    index = json.loads((step / "index.json").read_text())
    del index["manifest"][STATE]
    (step / "index.json").write_text(json.dumps(index))
    rc, out = _verify(step, capsys)
    assert rc == 1, out
    assert f"{step / STATE} is not listed in the manifest" in out


def test_hint_names_newest_earlier_step_that_verifies(tmp_path: Path, capsys) -> None:
    step3 = _save(tmp_path, steps=(1, 2, 3))
    step1, step2 = tmp_path / "step_00000001", tmp_path / "step_00000002"
    _flip(step3 / SHARD)
    rc, out = _verify(step3, capsys)
    assert rc == 1, out
    assert out.strip().splitlines()[-1].endswith(f"checkpoint.resume={step2}"), out
    (step2 / STATE).write_text("{}")  # step 2 damaged too: step 1 is the one to resume from
    rc, out = _verify(step3, capsys)
    assert rc == 1 and f"checkpoint.resume={step1}" in out and str(step2 / STATE) not in out
    _flip(step1 / SHARD)
    rc, out = _verify(step3, capsys)
    assert rc == 1 and "checkpoint.resume=" not in out, out
    assert f"no earlier committed step of {tmp_path} verifies clean" in out


def test_folder_without_committed_step_is_a_usage_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "step_00000004").mkdir()  # a crash during the first save
    rc, out = _verify(tmp_path, capsys)
    assert rc == 2 and f"error: {tmp_path} holds no committed checkpoint" in out, out


def test_without_verify_damage_is_not_checked(tmp_path: Path, capsys) -> None:
    step = _save(tmp_path)
    _flip(step / SHARD)
    assert main([str(step)]) == 0
    assert "manifest:" in capsys.readouterr().out
