"""How close a run's MoE routing came to a discrete flip: the router decision margins.

Routing is discontinuous. SparseMixer-v2 keeps an expert when its relative gap to the row max is
at most ``2 * jitter_eps``, picks by Gumbel-max over the kept logits and takes the argmax for the
Heun factor and in evaluation; top-k keeps the k largest logits. A token whose logit sits within
rounding (~1e-7) of one of these boundaries routes differently on a layout whose sums run in
another order, and from then on the two runs train different functions: the loss moves by
~1e-4 after one more step, a difference no layout bug made. (Seen: ``gpt_moe`` sp2 x
dp_replicate3 at seed 0, whose reference's step-2 margin is 7e-9.)

``record_margins`` wraps the routers of ``models.moe`` in this process (the single-process
reference runs here) and records, per router call, the smallest logit distance to any decision
boundary. The matrix compares a layout only against a reference whose smallest margin is at
least ``MIN_MARGIN``, so a flip cannot come from rounding, and any difference is a bug. Written
here because it is test instrumentation: the model computes no margins in training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

MIN_MARGIN = 1e-6
"""Logit units: ~10x the logit differences between layouts after 3 steps (~1e-7)."""


def _second_gap(v_TE: torch.Tensor) -> torch.Tensor:
    """Per row, the largest value minus the second (inf when fewer than two are finite)."""
    top2 = v_TE.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    return torch.where(torch.isfinite(top2[:, 1]), gap, torch.inf)


def sparsemixer_margin(
    logits_TE: torch.Tensor, jitter_eps: float, uniforms_T2X: torch.Tensor | None
) -> float:
    """Smallest logit distance to a SparseMixer-v2 decision boundary, over tokens and both
    slots: the keep mask's ``2 * eps`` threshold, the argmax, and the Gumbel-max pick."""
    s_TE = logits_TE.detach().float().clone()
    E = s_TE.shape[-1]
    gumbel_T2E = None
    if uniforms_T2X is not None:
        u = uniforms_T2X.float().clamp(torch.finfo(torch.float32).tiny, 1.0 - 1e-7)
        gumbel_T2E = -torch.log(-torch.log(u[..., :E]))
    worst = torch.inf
    for slot in range(2):
        top_T1 = s_TE.amax(-1, keepdim=True)
        denom_TE = torch.maximum(s_TE.abs(), top_T1).clamp_min(torch.finfo(torch.float32).tiny)
        finite_TE = torch.isfinite(s_TE)
        to_mask_TE = ((top_T1 - s_TE) - 2 * jitter_eps * denom_TE).abs()
        to_mask_TE = torch.where(finite_TE & (s_TE < top_T1), to_mask_TE, torch.inf)
        keep_TE = finite_TE & ((top_T1 - s_TE) / denom_TE <= 2 * jitter_eps)
        scored_TE = s_TE.masked_fill(~keep_TE, float("-inf"))
        if gumbel_T2E is not None:
            scored_TE = scored_TE + gumbel_T2E[:, slot]
        for m in (to_mask_TE.amin(-1), _second_gap(s_TE), _second_gap(scored_TE)):
            worst = min(worst, float(m.min()))
        s_TE = s_TE.scatter(-1, scored_TE.argmax(-1, keepdim=True), float("-inf"))
    return worst


def topk_margin(logits_TE: torch.Tensor, k: int) -> float:
    """Smallest gap between a token's k-th and (k+1)-th logit (its top-k set's boundary)."""
    v = logits_TE.detach().float().topk(min(k + 1, logits_TE.shape[-1]), dim=-1).values
    return float((v[:, k - 1] - v[:, k]).min()) if v.shape[-1] > k else float("inf")


@contextmanager
def record_margins() -> Iterator[list[float]]:
    """Within the block, every router call of ``models.moe`` appends its margin to the list."""
    import models.moe as moe

    margins: list[float] = []
    sparsemixer, topk = moe.sparsemixer_v2, moe.topk_softmax

    def sparsemixer_(logits_TE, jitter_eps=0.01, training=True, uniforms_T2X=None, *rest):
        u = uniforms_T2X if training else None
        margins.append(sparsemixer_margin(logits_TE, jitter_eps, u))
        return sparsemixer(logits_TE, jitter_eps, training, uniforms_T2X, *rest)

    def topk_(logits_TE, k):
        margins.append(topk_margin(logits_TE, k))
        return topk(logits_TE, k)

    moe.sparsemixer_v2, moe.topk_softmax = sparsemixer_, topk_
    try:
        yield margins
    finally:
        moe.sparsemixer_v2, moe.topk_softmax = sparsemixer, topk
