"""Mixture-of-experts feed-forward block, its routers, and the ``gpt_moe`` model.

Follows GRIN-MoE (Liu et al., 2024, "GRIN: GRadient-INformed MoE", arXiv:2409.12136) and its
released PhiMoE modeling code for the SparseMixer-v2 router, Switch Transformer / Mixtral for
the load-balancing loss and plain top-k routing, and Megablocks / torchtitan for dropless
dispatch (tokens sorted by expert, one grouped GEMM, no capacity factor, no padding).

Owns, as plain modules without process groups:

- ``sparsemixer_v2`` / ``topk_softmax``: the routers (fp32 math). SparseMixer-v2's backward is a
  custom autograd function: for a pick ``i`` with masked softmax ``pi`` the logits receive
  ``g * pi_i * (e_i - pi)``; the Heun factor (1, or 1 w.p. 0.25 / 1/3 w.p. 0.75 for a non-argmax
  sample) scales the forward weight only.
- ``GroupedExperts``: ``E`` SwiGLU experts stored as stacked tensors (E, D, H) / (E, H, D) and run
  with ``torch._grouped_mm`` where the backend has it (CPU fp32 with 16-byte aligned rows, CUDA
  bf16), else a loop over contiguous per-expert slices.
- ``MoE``: route -> sort by expert -> experts -> weight -> scatter-add back. Two seams for
  ``parallelism/expert_parallel.py``: ``dispatcher`` (replaces the local expert call by the
  all-to-all exchange) and ``stats_reduce`` (all-reduces the balancing statistics over the
  data/sequence-parallel group before the product, so the loss is the global-batch one).
- ``GPTMoE``: the Llama-style GPT whose blocks use ``MoE`` as feed-forward. The summed balancing
  loss of a training forward rides on the returned logits as ``logits.moe_aux_loss`` (a 0-d
  tensor in the graph), so the model family's loss function can add it without the trainer
  knowing about MoE.
  As a pipeline stage (the same class with the blocks it does not own removed) it passes the
  running sum of the balancing losses to the next stage next to the hidden states, so the last
  stage's loss includes every layer's.
- ``keyed_uniform``: SparseMixer's training noise as a pure function of (seed, layer, token
  key). The model family passes each token's global id in the step's batch as its key, so the
  noise a token gets is the same on every layout (tp ranks of a stage, pipeline stages, data and
  sequence shards, a single process) and under activation recompute. A per-rank ``torch.rand``
  stream cannot give that: a data-parallel rank would draw a different stream from the single
  process, and a later pipeline stage would not have consumed the earlier stages' draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ConfigError
from models.gpt import GPT, Block, GPTConfig, KVCache, LayerKV

ROUTERS = ("sparsemixer", "softmax")
BALANCE_CONVENTIONS = ("lattice", "hf")


@dataclass
class MoEConfig(GPTConfig):
    """GPT hyper-parameters plus the MoE ones (field docs: ``train.families.gpt_moe.MoEArgs``)."""

    n_experts: int = 8
    top_k: int = 2
    router: str = "sparsemixer"
    jitter_eps: float = 0.01
    aux_loss_coef: float = 0.01
    moe_ffn_hidden: int = 0
    """Hidden size of one expert; 0 means ffn_hidden // top_k (same active FFN parameters as
    the dense model)."""
    input_jitter: float = 0.0
    """Training only: the MoE input is multiplied by U(1 - j, 1 + j) per element (PhiMoE's
    ``input_jitter_noise``, Mixtral's ``router_jitter_noise``); 0 = off."""
    heun_third: float = 1.0 / 3.0
    """SparseMixer-v2's forward factor of a non-argmax pick on the 0.75 side of the Heun coin
    (GRIN's released code and transformers use 0.3333)."""
    balance_convention: str = "lattice"
    """``lattice``: the sum over layers of each layer's Switch loss with f = share of routed
    copies; ``hf``: transformers' ``load_balancing_loss_func`` (top-k of the softmax counted,
    statistics pooled over all layers before the product; top_k x lattice for one layer)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.balance_convention not in BALANCE_CONVENTIONS:
            raise ConfigError(
                f"model.balance_convention={self.balance_convention!r}: use 'lattice' or 'hf'"
            )
        if self.moe_ffn_hidden <= 0:
            self.moe_ffn_hidden = max(1, self.ffn_hidden // self.top_k)
        if self.router not in ROUTERS:
            raise ConfigError(f"model.router={self.router!r}: use 'sparsemixer' or 'softmax'")
        if self.router == "sparsemixer" and self.top_k != 2:
            raise ConfigError(f"model.top_k={self.top_k}: model.router=sparsemixer is top-2; set 2")
        if not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(
                f"model.top_k={self.top_k} must be in [1, model.n_experts={self.n_experts}]"
            )


# -- routers ----------------------------------------------------------------------------------
class _SparseMixerWeights(torch.autograd.Function):
    """Both slots at once. Forward: ``factor_k * pi_k[i_k]``. Backward: the logits receive
    ``sum_k g_k * pi_k[i_k] * (e_{i_k} - pi_k)`` (the factor is not applied, as in GRIN's
    released code)."""

    @staticmethod
    def forward(ctx, scores_TE, pi_TKE, pick_TK, factor_TK):  # type: ignore[override]
        w_TK = pi_TKE.gather(-1, pick_TK.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(pi_TKE, pick_TK, w_TK)
        return w_TK * factor_TK

    @staticmethod
    def backward(ctx, g_TK):  # type: ignore[override]
        pi_TKE, pick_TK, w_TK = ctx.saved_tensors
        e_TKE = torch.zeros_like(pi_TKE).scatter_(-1, pick_TK.unsqueeze(-1), 1.0)
        grad_TKE = (g_TK * w_TK).unsqueeze(-1) * (e_TKE - pi_TKE)
        return grad_TKE.sum(1), None, None, None


def _keep_mask(scores_TE: torch.Tensor, eps: float) -> torch.Tensor:
    """Experts whose relative gap to the row max, (max - s_j) / max(|s_j|, max), is <= 2 eps
    (-inf scores, i.e. unavailable experts, are never kept)."""
    top_T1 = scores_TE.amax(dim=-1, keepdim=True)
    denom = torch.maximum(scores_TE.abs(), top_T1).clamp_min_(torch.finfo(torch.float32).tiny)
    return (top_T1 - scores_TE) / denom <= 2 * eps  # inf / inf = nan: -inf is never kept


def sparsemixer_v2(
    logits_TE: torch.Tensor,
    jitter_eps: float = 0.01,
    training: bool = True,
    uniforms_T2X: torch.Tensor | None = None,
    heun_third: float = 1.0 / 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRIN's SparseMixer-v2 top-2 routing.

    Per token and slot: experts whose relative gap to the current max,
    ``(max - s_j) / max(|s_j|, max)``, exceeds ``2 * jitter_eps`` are masked; training picks by
    Gumbel-max over the masked logits, eval takes the argmax; the weight is
    ``softmax(masked)[pick]`` times the Heun factor (training, non-argmax picks: 1 w.p. 0.25,
    1/3 w.p. 0.75; else 1). The first pick is removed before slot 2. No renormalisation.

    Vectorised over tokens; the two slots share one softmax, one gather and one autograd node
    (slot 2's mask depends on slot 1's pick, so the masks are built one after the other).

    Args:
        logits_TE: (T, E) router logits (any dtype; the math runs in fp32).
        jitter_eps: the GRIN jitter epsilon.
        training: sample (True) or take the argmax (False).
        uniforms_T2X: optional (T, 2, E + 1) uniforms in (0, 1) for training: per slot, E for
            the Gumbel noise and 1 for the Heun coin. Default: ``torch.rand``.

    Returns:
        weights_T2 (fp32, differentiable w.r.t. the logits) and experts_T2 (int64).
    """
    scores_TE = logits_TE.float()
    T, E = scores_TE.shape
    with torch.no_grad():
        s1_TE = scores_TE.detach()
        if training:
            if uniforms_T2X is None:
                uniforms_T2X = torch.rand(T, 2, E + 1, device=scores_TE.device)
            u = clamp_uniforms(uniforms_T2X)
            gumbel_T2E = -torch.log(-torch.log(u[..., :E]))
            heun_T2 = torch.where(u[..., E] < 0.25, 1.0, heun_third)
        masked1_TE = s1_TE.masked_fill(~_keep_mask(s1_TE, jitter_eps), float("-inf"))
        argmax1_T1 = s1_TE.argmax(dim=-1, keepdim=True)
        if training:
            pick1_T1 = (masked1_TE + gumbel_T2E[:, 0]).argmax(dim=-1, keepdim=True)
        else:
            pick1_T1 = argmax1_T1
        s2_TE = s1_TE.scatter(-1, pick1_T1, float("-inf"))  # slot 1's expert is unavailable
        masked2_TE = s2_TE.masked_fill(~_keep_mask(s2_TE, jitter_eps), float("-inf"))
        argmax2_T1 = s2_TE.argmax(dim=-1, keepdim=True)
        if training:
            pick2_T1 = (masked2_TE + gumbel_T2E[:, 1]).argmax(dim=-1, keepdim=True)
        else:
            pick2_T1 = argmax2_T1
        picks_T2 = torch.cat([pick1_T1, pick2_T1], dim=-1)
        if training:
            is_max_T2 = picks_T2 == torch.cat([argmax1_T1, argmax2_T1], dim=-1)
            factor_T2 = torch.where(is_max_T2, 1.0, heun_T2)
        else:
            factor_T2 = torch.ones(T, 2, device=scores_TE.device)
        pi_T2E = torch.softmax(torch.stack([masked1_TE, masked2_TE], dim=1), dim=-1)
    return _SparseMixerWeights.apply(scores_TE, pi_T2E, picks_T2, factor_T2), picks_T2


def clamp_uniforms(u: torch.Tensor) -> torch.Tensor:
    """Uniforms in [tiny, 1 - 1e-7] (fp32), so ``-log(-log(u))`` is finite."""
    return u.float().clamp(torch.finfo(torch.float32).tiny, 1.0 - 1e-7)


def topk_softmax(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain top-k routing (Mixtral): softmax in fp32, top-k, weights renormalised to sum 1.

    Returns:
        weights_TK (fp32) and experts_TK (int64).
    """
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    w_TK, idx_TK = probs_TE.topk(k, dim=-1)
    return w_TK / w_TK.sum(dim=-1, keepdim=True), idx_TK


# -- experts ----------------------------------------------------------------------------------
class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``_grouped_mm``'s CPU
    backward rejects expanded gradients)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g.contiguous()


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu" and x.dtype != torch.float32:
        return False
    row = lambda t: t.shape[-1] * t.element_size()  # noqa: E731
    return row(x) % 16 == 0 and row(w) % 16 == 0 and x.dtype == w.dtype


def grouped_matmul(
    x_ND: torch.Tensor, w_EDH: torch.Tensor, counts_E: torch.Tensor, use_grouped_mm: bool = True
) -> torch.Tensor:
    """Rows of ``x`` sorted by group times their group's matrix.

    Args:
        x_ND: (N, D) rows, the first counts[0] for group 0, then group 1, ...
        w_EDH: (E, D, H) one matrix per group.
        counts_E: (E,) rows per group (sum N); zero counts are fine.
        use_grouped_mm: allow ``torch._grouped_mm``.

    Returns:
        (N, H).
    """
    if use_grouped_mm and _grouped_mm_ok(x_ND, w_EDH):
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x_ND, w_EDH, offs=offs))
    splits = counts_E.tolist()
    outs = [xe @ w_EDH[e] for e, xe in enumerate(torch.split(x_ND, splits))]
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w_EDH.shape[-1])


class GroupedExperts(nn.Module):
    """``E`` SwiGLU experts as stacked weights: w1, w3 (E, D, H) and w2 (E, H, D)."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.use_grouped_mm = True

    @staticmethod
    def compute(
        x_ND: torch.Tensor,
        counts_E: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        w3: torch.Tensor,
        use_grouped_mm: bool = True,
    ) -> torch.Tensor:
        """SwiGLU of sorted rows with explicit (possibly local-shard) weights; (N, D) -> (N, D)."""
        dt = x_ND.dtype
        w1, w2, w3 = (w.to(dt) for w in (w1, w2, w3))
        h = F.silu(grouped_matmul(x_ND, w1, counts_E, use_grouped_mm))
        h = h * grouped_matmul(x_ND, w3, counts_E, use_grouped_mm)
        return grouped_matmul(h, w2, counts_E, use_grouped_mm)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return self.compute(x_ND, counts_E, self.w1, self.w2, self.w3, self.use_grouped_mm)


# -- layout-invariant noise ------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash (the "lowbias" finalizer) on int64 values in [0, 2^32): every
    product stays below 2^59, so int64 arithmetic never overflows."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def keyed_uniform(keys: torch.Tensor, salt: int, n: int) -> torch.Tensor:
    """(T,) int64 keys >= 0 -> (T, n) fp32 uniforms in (0, 1), a pure function of
    (key, salt, column): the same token key gets the same numbers on any rank, in any order."""
    salt = int(_mix32(_mix32(salt & _M32) ^ (salt >> 32 & _M32)))
    lo, hi = keys & _M32, keys >> 32
    h = _mix32(_mix32(lo ^ salt) ^ hi)
    cols = _mix32((torch.arange(n, device=keys.device) * 0x9E3779B1 + 1) & _M32)
    bits = _mix32(h[:, None] ^ cols[None, :])
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


# -- the block --------------------------------------------------------------------------------
Dispatcher = Callable[[torch.Tensor, torch.Tensor, GroupedExperts], torch.Tensor]


class MoE(nn.Module):
    """Dropless top-k mixture of SwiGLU experts.

    Example::

        moe = MoE(dim=64, hidden=128, n_experts=8, top_k=2, router="sparsemixer")
        y_BSD = moe(x_BSD)          # moe.aux_loss holds the balancing loss (training only)
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_experts: int,
        top_k: int = 2,
        router: str = "sparsemixer",
        jitter_eps: float = 0.01,
        input_jitter: float = 0.0,
        heun_third: float = 1.0 / 3.0,
        balance_convention: str = "lattice",
    ) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.router_kind, self.jitter_eps = (
            n_experts,
            top_k,
            router,
            jitter_eps,
        )
        self.input_jitter, self.heun_third = input_jitter, heun_third
        self.balance_convention = balance_convention
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = GroupedExperts(n_experts, dim, hidden)
        self.dispatcher: Dispatcher | None = None
        """Set by expert parallelism: runs the experts on sorted tokens across ranks."""
        self.stats_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        """Set by data/sequence parallelism: sums balancing statistics over the group."""
        self.uniform_fn: Callable[[int, int], torch.Tensor] | None = None
        """Optional (T, E) -> (T, 2, E + 1) uniforms for SparseMixer sampling (tests)."""
        self.noise_salt = 0
        """Folded into ``keyed_uniform``: ``GPTMoE`` sets it from the layer index (and the
        family adds the run's seed), so layers and runs draw independent noise."""
        self.aux_loss: torch.Tensor | None = None
        self.aux_stats: torch.Tensor | None = None
        """``balance_convention=hf``: (counts_E, probsum_E, n) of the last training forward,
        pooled over layers by ``hf_balance_loss``."""
        self.last_load: torch.Tensor | None = None
        self.last_entropy: float | None = None

    def route(
        self, x_TD: torch.Tensor, keys_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns router logits_TE (fp32), weights_TK (fp32) and experts_TK (int64).

        ``keys_T``: each token's key for the SparseMixer noise (``keyed_uniform``); without
        keys (or ``uniform_fn``) the noise comes from ``torch.rand``."""
        with torch.autocast(x_TD.device.type, enabled=False):  # router math in fp32
            logits_TE = self.router(x_TD.float())
        if self.router_kind == "sparsemixer":
            u = None
            if self.training and self.uniform_fn is not None:
                u = self.uniform_fn(*logits_TE.shape).to(logits_TE.device)
            elif self.training and keys_T is not None:
                T, E = logits_TE.shape
                u = keyed_uniform(keys_T, self.noise_salt, 2 * (E + 1)).view(T, 2, E + 1)
            w, idx = sparsemixer_v2(logits_TE, self.jitter_eps, self.training, u, self.heun_third)
        else:
            w, idx = topk_softmax(logits_TE, self.top_k)
        return logits_TE, w, idx

    def balance_loss(self, logits_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        """Switch-Transformer loss ``E * sum_e f_e * P_e`` with counts and probabilities summed
        over the ``stats_reduce`` group first (global-batch balancing). Also records the load
        histogram and the mean routing entropy."""
        E = self.n_experts
        probs_TE = torch.softmax(logits_TE, dim=-1)
        counts_E = torch.bincount(experts_TK.flatten(), minlength=E).float()
        entropy = -(probs_TE * torch.log(probs_TE.clamp_min(1e-30))).sum(-1).sum().detach()
        n_tok = torch.tensor([float(logits_TE.shape[0])], device=logits_TE.device)
        stats = torch.cat([counts_E, probs_TE.sum(0), n_tok, entropy.view(1)])
        if self.stats_reduce is not None:
            stats = self.stats_reduce(stats)
        counts_E, psum_E, n, ent = stats[:E].detach(), stats[E : 2 * E], stats[2 * E], stats[-1]
        self.last_load = (counts_E / counts_E.sum()).cpu()
        self.last_entropy = float((ent / n).detach())
        f_E = counts_E / (n.detach() * experts_TK.shape[-1])
        return E * (f_E * (psum_E / n.detach())).sum()

    def hf_stats(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """transformers' balancing statistics of one layer: (counts_E of the top-k of the
        softmax, probsum_E, n) concatenated, summed over the ``stats_reduce`` group."""
        E = self.n_experts
        probs_TE = torch.softmax(logits_TE, dim=-1)
        picks = probs_TE.topk(self.top_k, dim=-1).indices.flatten()
        counts_E = torch.bincount(picks, minlength=E).float()
        n_tok = torch.tensor([float(logits_TE.shape[0])], device=logits_TE.device)
        stats = torch.cat([counts_E, probs_TE.sum(0), n_tok])
        return self.stats_reduce(stats) if self.stats_reduce is not None else stats

    def jitter(self, x_TD: torch.Tensor, keys_T: torch.Tensor | None) -> torch.Tensor:
        """``x * U(1 - j, 1 + j)`` elementwise (training, ``input_jitter`` > 0), the uniforms
        keyed by token like the router noise (salted apart from it)."""
        if not self.training or self.input_jitter <= 0:
            return x_TD
        if keys_T is None:
            u_TD = torch.rand_like(x_TD, dtype=torch.float32)
        else:
            u_TD = keyed_uniform(keys_T, self.noise_salt + (1 << 31), x_TD.shape[-1])
        j = self.input_jitter
        return (x_TD.float() * (1.0 - j + 2.0 * j * u_TD)).to(x_TD.dtype)

    def forward(self, x_BSD: torch.Tensor, keys_BS: torch.Tensor | None = None) -> torch.Tensor:
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, shape[-1])
        keys_T = keys_BS.reshape(-1).to(x_TD.device) if keys_BS is not None else None
        x_TD = self.jitter(x_TD, keys_T)
        logits_TE, w_TK, idx_TK = self.route(x_TD, keys_T)
        self.aux_loss = self.aux_stats = None
        if self.training and self.balance_convention == "hf":
            self.aux_stats = self.hf_stats(logits_TE)
        elif self.training:
            self.aux_loss = self.balance_loss(logits_TE, idx_TK)
        flat_e = idx_TK.flatten()
        order = torch.argsort(flat_e, stable=True)
        tok = order // idx_TK.shape[-1]
        counts_E = torch.bincount(flat_e, minlength=self.n_experts)
        x_sorted = x_TD[tok]
        if self.dispatcher is not None:
            y_sorted = self.dispatcher(x_sorted, counts_E, self.experts)
        else:
            y_sorted = self.experts(x_sorted, counts_E)
        y_sorted = (y_sorted.float() * w_TK.flatten()[order, None]).to(x_TD.dtype)
        out_TD = torch.zeros_like(x_TD).index_add(0, tok, y_sorted)
        return out_TD.view(shape)


def hf_balance_loss(stats: list[torch.Tensor]) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func``: ``E * sum_e (C_e / N) * (P_e / N)`` with the
    counts C, probability sums P and token rows N of every layer added up first.

    Args:
        stats: per layer, ``MoE.hf_stats`` (2E + 1,): counts_E, probsum_E, n.
    """
    total = torch.stack(stats).sum(0)
    E = (total.shape[0] - 1) // 2
    n = total[-1].detach()
    return E * ((total[:E].detach() / n) * (total[E : 2 * E] / n)).sum()


def dense_moe_reference(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k * Expert_{i_k}(x)`` token by token (the naive per-token loop; tests and the
    benchmark's baseline)."""
    _, w_TK, idx_TK = moe.route(x_TD)
    ex = moe.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(idx_TK.shape[1]):
            e = int(idx_TK[t, k])
            h = F.silu(x_TD[t] @ ex.w1[e]) * (x_TD[t] @ ex.w3[e])
            out[t] += w_TK[t, k] * (h @ ex.w2[e])
    return out


# -- the model --------------------------------------------------------------------------------
class MoEBlock(Block):
    """Transformer block whose feed-forward is a ``MoE``."""

    def make_ffn(self, cfg: GPTConfig) -> nn.Module:
        assert isinstance(cfg, MoEConfig)
        return MoE(
            cfg.dim,
            cfg.moe_ffn_hidden,
            cfg.n_experts,
            cfg.top_k,
            cfg.router,
            cfg.jitter_eps,
            cfg.input_jitter,
            cfg.heun_third,
            cfg.balance_convention,
        )

    def forward(
        self,
        x: torch.Tensor,
        cos_SD: torch.Tensor,
        sin_SD: torch.Tensor,
        keys: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv: LayerKV | None = None,
    ) -> torch.Tensor:
        """As ``Block.forward``; ``keys`` (B, S) key the router noise of these tokens."""
        h = x + self.attend(self.attention_norm(x), cos_SD, sin_SD, kv, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h), keys)


class GPTMoE(GPT):
    """Llama-style GPT with MoE feed-forward blocks (GRIN-MoE's architecture, tiny)."""

    block_cls = MoEBlock
    stage_extras = ("keys", "aux")

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        for key, block in self.layers.items():
            block.feed_forward.noise_salt = int(key)  # the global layer index

    def moe_layers(self) -> dict[str, MoE]:
        """Layer key -> its MoE module (whatever wrappers surround the blocks)."""
        return {k: m for k, b in self.layers.items() for m in b.modules() if isinstance(m, MoE)}

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor | None = None,
        aux_in: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``GPT.forward``; a training forward carries the summed balancing loss of every MoE
        layer on the logits as ``moe_aux_loss``.

        As a pipeline stage (``parallelism.pipeline.split_model`` removes the blocks a stage
        does not own) the balancing losses of every stage must reach the loss on the last
        stage: a stage without the output projection returns ``(hidden_BSD, keys, aux)``
        (``keys``, the (B, S) int64 keys of the router noise, pass through), where
        ``aux`` (0-d fp32, in the graph) is the incoming ``aux_in`` plus its own layers'
        losses; the pipeline sends it forward like an activation and its gradient
        (``aux_loss_coef / n_micro``) back like one. ``aux_in`` is None on the first stage.
        """
        out = GPT.forward(self, x, positions, cache, keys=keys, attn_mask=attn_mask)
        aux = aux_in
        if self.training:
            own = [m.aux_loss for m in self.moe_layers().values() if m.aux_loss is not None]
            pooled = [m.aux_stats for m in self.moe_layers().values() if m.aux_stats is not None]
            if pooled:  # balance_convention=hf (one pipeline stage: refused with pp > 1)
                own = [hf_balance_loss(pooled)]
            if own:
                aux = torch.stack(own).sum() if aux is None else aux + torch.stack(own).sum()
        if self.output is None:
            aux = aux if aux is not None else out.new_zeros((), dtype=torch.float32)
            return out, keys, aux
        if self.training and aux is not None:
            out.moe_aux_loss = aux
        return out

    def init_tensor(
        self, name: str, shape: tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """As ``GPT.init_tensor``; expert weights (E, in, out) are drawn at their full logical
        shape, w2 with the depth-scaled std."""
        if ".experts.w" in name:
            std = self.cfg.init_std
            if name.endswith("experts.w2"):
                std /= math.sqrt(2 * self.cfg.n_layers)
            return torch.empty(shape).normal_(0.0, std, generator=generator)
        return super().init_tensor(name, shape, generator)


def build_gpt_moe(model_args: object) -> GPTMoE:
    """Build a GPTMoE from ``MoEArgs`` (or any object with the same fields)."""
    fields = MoEConfig.__dataclass_fields__
    kwargs = {k: getattr(model_args, k) for k in fields if hasattr(model_args, k)}
    return GPTMoE(MoEConfig(**kwargs))
