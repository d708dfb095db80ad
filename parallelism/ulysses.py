"""DeepSpeed-Ulysses sequence parallelism around the model's own attention.

Jacobs et al., "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long
Sequence Transformer Models" (2023). Every rank of an ``sp`` group holds a contiguous slice of
each sequence, (B, S/sp, H, D). Around attention one all-to-all swaps sequence sharding for head
sharding, (B, S, H/sp, D), the unchanged attention runs on full sequences for its heads (causal
mask and rotary embedding are right because rotary was applied with the global positions before
the swap), and a second all-to-all swaps back. Everything outside attention (norms, MLP, loss)
stays sequence-sharded. Per layer and rank the forward hands 4 all-to-alls B*S*H*D/sp elements each
(q, k, v in; output out; the backward mirrors them): the paper's per-link volume M/P, constant when
S and sp grow together. A (sp-1)/sp share of it leaves the rank, so off-rank bytes stay below that
payload, whereas all-gather based schemes send (sp-1) times the local K/V shard.
``benchmarks/ulysses.py`` counts both at the collectives.

Why written here rather than taken from DeepSpeed: DeepSpeed's ``DistributedAttention`` expects
its own (S, B, H, D) layout and process-group plumbing and carries DeepSpeed as a dependency; ours
is ~80 lines on ``all_to_all_single``, takes the plain model's (B, S, H, D) ``CoreAttention``
seam, replicates grouped-query kv heads when there are fewer than ``sp`` of them, and composes
with DTensor tensor parallelism (heads are split by tp first, then by sp).
``benchmarks/ulysses.py`` checks ours against DeepSpeed's layer on identical inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallelism.dims import LayoutError


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """all_to_all_single over dim 0 (which must have ``group`` size chunks)."""
    x = x.contiguous()
    out = torch.empty_like(
        x
    )  # from the contiguous copy: empty_like keeps a permuted view's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_head(x_BsHD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, S/sp, H, D) sequence-sharded -> (B, S, H/sp, D) head-sharded."""
    sp = dist.get_world_size(group)
    B, s, H, D = x_BsHD.shape
    x = x_BsHD.reshape(B, s, sp, H // sp, D).permute(2, 1, 0, 3, 4)  # (sp, s, B, h, D)
    y = _all_to_all(x, group)  # chunk j now holds sequence slice j of my heads
    return y.reshape(sp * s, B, H // sp, D).permute(1, 0, 2, 3)


def head_to_seq(x_BShD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, S, H/sp, D) head-sharded -> (B, S/sp, H, D) sequence-sharded."""
    sp = dist.get_world_size(group)
    B, S, h, D = x_BShD.shape
    x = x_BShD.reshape(B, sp, S // sp, h, D).permute(1, 2, 0, 3, 4)  # (sp, s, B, h, D)
    y = _all_to_all(x, group)  # chunk j now holds head group j of my sequence slice
    return y.permute(2, 1, 0, 3, 4).reshape(B, S // sp, sp * h, D)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return seq_to_head(x, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return head_to_seq(g, ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return head_to_seq(x, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return seq_to_head(g, ctx.group), None


def expand_kv_heads(kv_BsKD: torch.Tensor, sp: int) -> torch.Tensor:
    """Repeat grouped-query kv heads so ``sp`` divides their number (needs K | sp when K < sp).

    Query head h uses kv head h // (H/K). After the repeat, rank r's contiguous block of query
    heads still finds its kv head in rank r's block (its gradient sums over the copies).
    """
    K = kv_BsKD.shape[2]
    if K % sp == 0:
        return kv_BsKD
    return kv_BsKD.repeat_interleave(sp // K, dim=2)


class UlyssesAttention(nn.Module):
    """Wraps a (B, S, H, D) attention core with the two Ulysses all-to-alls."""

    def __init__(self, core: nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.core = core
        self.group = group
        self.sp = dist.get_world_size(group)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attn_mask`` (B, 1, S, S) covers the full sequence: passed to the core as is."""
        k, v = expand_kv_heads(k, self.sp), expand_kv_heads(v, self.sp)
        q, k, v = (_SeqToHead.apply(t, self.group) for t in (q, k, v))
        o = self.core(q, k, v) if attn_mask is None else self.core(q, k, v, attn_mask)
        return _HeadToSeq.apply(o, self.group)


def validate_ulysses(n_heads: int, n_kv_heads: int, tp: int, sp: int, seq_len: int) -> None:
    """Reject layouts Ulysses cannot run, naming the numbers."""
    if sp == 1:
        return
    if n_heads % (tp * sp):
        raise LayoutError(
            f"model.n_heads={n_heads} is not divisible by parallel.tp x parallel.sp = {tp} x {sp}: "
            "heads are split by tp, then by sp"
        )
    if n_kv_heads % tp:
        raise LayoutError(
            f"model.n_kv_heads={n_kv_heads} is not divisible by parallel.tp={tp}: each "
            "tensor-parallel rank needs whole kv heads; set model.n_kv_heads to a multiple of "
            f"{tp} or lower parallel.tp"
        )
    kv_local = n_kv_heads // tp
    if kv_local % sp and sp % kv_local:
        ok = [k * tp for k in range(1, n_heads // tp + 1) if (k % sp == 0 or sp % k == 0)]
        ok = [k for k in ok if n_heads % k == 0]
        raise LayoutError(
            f"model.n_kv_heads={n_kv_heads} leaves {kv_local} kv heads per tensor-parallel "
            f"rank, which neither divides nor is a multiple of parallel.sp={sp} (Ulysses "
            f"splits them over sp ranks or replicates them); set model.n_kv_heads to one of "
            f"{ok} or change parallel.sp"
        )
    if seq_len % sp:
        raise LayoutError(f"train.seq_len={seq_len} is not divisible by parallel.sp={sp}")


def apply_ulysses(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Wrap every block's ``attention.core`` (models.gpt.CoreAttention) with Ulysses."""
    for block in model.layers.values():
        attn = block.attention
        attn.core = UlyssesAttention(attn.core, group)


def sequence_slice(seq_len: int, sp_rank: int, sp: int) -> slice:
    """This sp rank's contiguous slice of every sequence."""
    s = seq_len // sp
    return slice(sp_rank * s, (sp_rank + 1) * s)
