"""The layout matrix's router margins (``tests.matrix.margins``): a perturbation smaller than
the margin never changes a routing decision, and a tie has margin zero."""

from __future__ import annotations

import torch

from models.moe import _keep_mask, sparsemixer_v2, topk_softmax
from tests.matrix.margins import record_margins, sparsemixer_margin, topk_margin


def _decisions(logits_TE: torch.Tensor, u: torch.Tensor) -> tuple:
    _, picks = sparsemixer_v2(logits_TE, 0.01, True, u)
    s2 = logits_TE.scatter(-1, picks[:, :1], float("-inf"))
    return picks, _keep_mask(logits_TE, 0.01), _keep_mask(s2, 0.01), logits_TE.argmax(-1)


def test_perturbation_below_the_margin_keeps_every_decision() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(64, 8, generator=g) * 0.01  # small logits: many kept experts
        u = torch.rand(64, 2, 9, generator=g)
        m = sparsemixer_margin(logits, 0.01, u)
        noise = (torch.rand(64, 8, generator=g) * 2 - 1) * (0.25 * m)
        for a, b in zip(_decisions(logits, u), _decisions(logits + noise, u)):
            assert torch.equal(a, b)


def test_a_tie_has_zero_margin() -> None:
    logits = torch.tensor([[0.5, 0.5, -1.0, -2.0]])
    assert sparsemixer_margin(logits, 0.01, None) == 0.0
    assert topk_margin(torch.tensor([[3.0, 2.0, 2.0, 1.0]]), 2) == 0.0
    assert topk_margin(torch.tensor([[3.0, 2.0, 1.5, 1.0]]), 2) == 0.5


def test_record_margins_wraps_and_restores_the_routers() -> None:
    import models.moe as moe

    logits = torch.randn(16, 8)
    with record_margins() as margins:
        w, idx = moe.topk_softmax(logits, 2)
        moe.sparsemixer_v2(logits, 0.01, False)
    assert len(margins) == 2 and margins[0] == topk_margin(logits, 2)
    want_w, want_idx = topk_softmax(logits, 2)
    assert torch.equal(w, want_w) and torch.equal(idx, want_idx)
    assert moe.topk_softmax is topk_softmax and moe.sparsemixer_v2 is sparsemixer_v2
