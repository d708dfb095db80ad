from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import ConfigError
from train.data import DataError, TokenLoader, TokenShards, resolve_data_dir, write_shards

ROOT = Path(__file__).resolve().parents[2]


def _global_batches(
    shards: TokenShards, dp: int, steps: int, micro: int, start: int = 0
) -> list[torch.Tensor]:
    loaders = [TokenLoader(shards, 16, 8, micro, r, dp, seed=3) for r in range(dp)]
    for ld in loaders:
        ld.load_state_dict({"consumed_samples": start, "seed": 3})
    out = []
    for _ in range(steps):
        per_rank = [ld.next_batch() for ld in loaders]  # rank r's micro-batch k: global rows
        parts = [per_rank[r][k][0] for k in range(len(per_rank[0])) for r in range(dp)]
        out.append(torch.cat(parts))  # (k*dp + r)*micro.., so this is the step's row order
    return out


def test_global_batch_is_layout_invariant(tiny_data: str) -> None:
    shards = TokenShards.open(Path(tiny_data), "train")
    ref = _global_batches(shards, 1, 4, 2)
    for dp, micro in ((2, 2), (4, 1), (8, 1)):
        for a, b in zip(ref, _global_batches(shards, dp, 4, micro)):
            assert torch.equal(a, b)


def test_resume_on_another_dp_size_continues_the_same_samples(tiny_data: str) -> None:
    shards = TokenShards.open(Path(tiny_data), "train")
    straight = _global_batches(shards, 1, 6, 8)
    ld = TokenLoader(shards, 16, 8, 2, 0, 2, seed=3)
    for _ in range(3):
        ld.next_batch()
    state = ld.state_dict()  # saved at step 3 with dp=2
    assert state["consumed_samples"] == 24
    resumed = _global_batches(shards, 4, 3, 1, start=state["consumed_samples"])
    for a, b in zip(straight[3:], resumed):
        assert torch.equal(a, b)


def test_targets_are_shifted_inputs(tiny_data: str) -> None:
    shards = TokenShards.open(Path(tiny_data), "train")
    x, y = TokenLoader(shards, 16, 4, 4, shuffle=False).next_batch()[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[0], torch.from_numpy(shards.tokens[:16].astype(np.int64)))


def test_prepare_cli_writes_uint16_shards(tmp_path: Path) -> None:
    src = tmp_path / "texts"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}.txt").write_text(f"file {i} " * 50)
    out = tmp_path / "shards"
    subprocess.run(
        [sys.executable, "-m", "train.prepare", "--out", str(out), str(src)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 256
    tr = np.fromfile(out / "train.bin", dtype=np.uint16)
    va = np.fromfile(out / "val.bin", dtype=np.uint16)
    # bytes tokenizer: one token per byte, and EOS (id 0) after each piece. 40 files x the
    # default val fraction give < 4 val documents, so each file is split by bytes (docs/data.md):
    # its head in train, its tail in val, each ending in EOS
    n_bytes = sum(len(f.read_bytes()) for f in src.iterdir())
    assert np.count_nonzero(tr) + np.count_nonzero(va) == n_bytes
    assert (tr == 0).sum() == (va == 0).sum() == 40 and tr[-1] == va[-1] == 0
    assert va.size > 0 and tr.size > va.size


def test_missing_data_path_is_a_clear_error(tmp_path: Path) -> None:
    class D:
        name, path = "shards", str(tmp_path / "nope")

    with pytest.raises(DataError, match=r"data\.path"):
        resolve_data_dir(D())


def _shards(tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    rng = np.random.default_rng(0)
    tr, va = rng.integers(0, 256, 5000), rng.integers(0, 256, 500)
    write_shards(out, tr, va, 256, "test")
    return out


class _Shards:
    name = "shards"

    def __init__(self, path: Path) -> None:
        self.path = str(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: os.truncate(p, 2000), r"train\.bin holds 1000 tokens but .*train_tokens=5000"),
        (lambda p: os.truncate(p, 2001), r"train\.bin is 2001 bytes, not a whole number of uint16"),
        (lambda p: os.truncate(p, 0), r"train\.bin is empty"),
        (lambda p: p.unlink(), r"train\.bin is missing"),
    ],
    ids=["truncated", "odd_sized", "empty", "missing"],
)
def test_damaged_train_bin_is_refused_against_meta(tmp_path: Path, damage, message) -> None:
    out = _shards(tmp_path)
    assert resolve_data_dir(_Shards(out)) == out  # intact: accepted
    damage(out / "train.bin")
    with pytest.raises(DataError, match=message) as e:
        resolve_data_dir(_Shards(out))
    assert "python -m train.prepare" in str(e.value) and "\n" not in str(e.value)


def test_unreadable_meta_json_is_refused(tmp_path: Path) -> None:
    out = _shards(tmp_path)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json is unreadable"):
        resolve_data_dir(_Shards(out))


def test_vocab_size_comes_from_meta_json_and_a_smaller_one_is_refused(tmp_path, monkeypatch):
    """model.vocab_size=0 (the default) takes the data's vocabulary; one below it is refused
    naming both (ids would index past the embedding); a larger one is padding."""
    from train.cli import load_config
    from train.trainer import plan_run

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = tmp_path / "shards"
    toks = np.arange(4096, dtype=np.uint16) % 300
    write_shards(data, toks, toks[:512], 300, "test")
    base = [
        f"data.path={data}",
        "data.name=shards",
        "model.dim=32",
        "model.n_layers=1",
        "train.seq_len=16",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
    ]
    job, _ = load_config(base)
    assert job.model.vocab_size == 0
    plan_run(job)
    assert job.model.vocab_size == 300
    job, _ = load_config([*base, "model.vocab_size=256"])
    with pytest.raises(
        ConfigError,
        match=r"model.vocab_size=256 is below the data's vocabulary "
        r"of 300 \(.*meta.json\)",
    ):
        plan_run(job)
    job, _ = load_config([*base, "model.vocab_size=320"])
    plan_run(job)
    assert job.model.vocab_size == 320
    assert json.loads((data / "meta.json").read_text())["vocab_size"] == 300


def test_bits_per_byte_uses_the_recorded_text_bytes():
    from train.families.gpt import tokens_per_byte

    assert tokens_per_byte({"vocab_size": 256, "tokenizer": "bytes", "val_tokens": 10}, "val") == 1
    bpe = {
        "vocab_size": 512,
        "tokenizer": {"kind": "hf", "name": "t.json"},
        "val_tokens": 250,
        "text_bytes": {"val": 1000},
    }
    assert tokens_per_byte(bpe, "val") == 0.25  # 4 bytes per token
    assert tokens_per_byte({**bpe, "text_bytes": {}}, "val") is None  # not recorded: not guessed
