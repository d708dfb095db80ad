"""``validate_ulysses`` rejects layouts Ulysses cannot run, with an error naming the numbers."""

from __future__ import annotations

import pytest

from parallelism.dims import LayoutError
from parallelism.ulysses import expand_kv_heads, validate_ulysses


@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "tp", "sp", "seq_len", "message"),
    [
        (6, 6, 1, 4, 64, "model.n_heads=6 is not divisible by parallel.tp x parallel.sp = 1 x 4"),
        (8, 8, 2, 8, 64, "model.n_heads=8 is not divisible by parallel.tp x parallel.sp = 2 x 8"),
        (
            12,
            6,
            1,
            4,
            64,
            "model.n_kv_heads=6 leaves 6 kv heads per tensor-parallel rank",
        ),  # 6 vs 4
        (8, 3, 1, 2, 64, "set model.n_kv_heads to one of [1, 2, 4, 8]"),  # 3 vs 2
        (
            8,
            2,
            4,
            2,
            64,
            "model.n_kv_heads=2 is not divisible by parallel.tp=4",
        ),  # kv not split by tp
        (8, 8, 1, 4, 30, "train.seq_len=30 is not divisible by parallel.sp=4"),
    ],
)
def test_rejects_bad_layout_naming_the_numbers(
    n_heads: int, n_kv_heads: int, tp: int, sp: int, seq_len: int, message: str
) -> None:
    with pytest.raises(LayoutError) as err:
        validate_ulysses(n_heads, n_kv_heads, tp, sp, seq_len)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "tp", "sp", "seq_len"),
    [
        (8, 8, 1, 1, 7),  # sp=1: nothing to check
        (8, 8, 1, 8, 64),
        (8, 2, 1, 4, 64),  # GQA: 2 kv heads < sp=4, replicated
        (8, 1, 1, 8, 64),  # MQA
        (8, 4, 2, 2, 64),  # 2 kv heads per tp rank, sp=2
        (16, 8, 1, 4, 64),  # 8 kv heads, 2 per sp rank
    ],
)
def test_accepts_good_layout(n_heads: int, n_kv_heads: int, tp: int, sp: int, seq_len: int) -> None:
    validate_ulysses(n_heads, n_kv_heads, tp, sp, seq_len)


def test_expand_kv_heads_gives_each_rank_its_query_heads_kv() -> None:
    import torch

    H, K, sp = 8, 2, 4
    kv = torch.arange(K).float().view(1, 1, K, 1)  # kv head j holds the value j
    out = expand_kv_heads(kv, sp)
    assert out.shape[2] == sp
    for r in range(sp):  # rank r holds query heads [r*H/sp, (r+1)*H/sp) and kv copy r
        for h in range(r * H // sp, (r + 1) * H // sp):
            assert out[0, 0, r, 0].item() == h // (H // K)
