"""Llama-style decoder (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention).

A plain ``nn.Module`` that knows nothing of process groups (torchtitan's ``llama3`` model is
the model for it). Hooks that parallelism relies on, all without changing the math:

- ``layers`` is an ``nn.ModuleDict`` keyed ``"0".."L-1"``: a pipeline stage deletes the blocks
  it does not own and keeps the original parameter names (``layers.5.attention.wq.weight``).
- ``tok_embeddings``, ``norm`` and ``output`` may be ``None`` on middle/first/last stages;
  ``forward`` then takes or returns hidden states.
- Shapes use ``-1`` for head counts, so tensor parallelism can shard the projections
  column-wise and the same code runs on the local heads.
- Attention's inner product is the ``CoreAttention`` submodule with (B, S, H, D) inputs, the
  seam where Ulysses sequence parallelism inserts its all-to-alls.
- ``forward(tokens, positions)`` takes global position ids, so a sequence shard applies the
  rotary embedding of its true positions.
- ``init_tensor(name, shape, generator)`` defines each parameter's initial value from its
  name alone, so the same seed gives the same weights whatever the layout.
- ``forward(tokens, cache=KVCache(...))`` is the inference path (``train/generate.py``): each
  attention appends its new keys/values to the cache and attends over all cached positions,
  and the rotary positions start at the cache's length. Without a cache the training forward
  runs unchanged (the cached path never touches ``CoreAttention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ConfigError


def nearest_divisor(n: int, k: int) -> int:
    """The divisor of ``n`` closest to ``k`` (the smaller one on a tie): a suggested fix."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


@dataclass
class GPTConfig:
    """Model hyper-parameters (field docs: ``train.families.gpt.GPTArgs``). Derived sizes
    (kv heads, SwiGLU hidden, padded vocabulary) are computed here once; a config that cannot
    build raises ``ConfigError`` naming the ``model.*`` field."""

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0
    ffn_hidden: int = 0
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    padded_vocab_size: int = 0
    """Rows of the embedding/output (>= vocab_size, e.g. padded to a multiple of tp); 0 = none."""
    head_dim: int = 0
    """Per-head size; 0 means dim // n_heads."""
    norm: str = "rmsnorm"
    """``rmsnorm`` (weight only) or ``layernorm`` (weight and bias, PhiMoE)."""
    attention_bias: bool = False
    """Biases on the q/k/v/o projections."""
    lm_head_bias: bool = False
    """A bias on the output projection."""
    sliding_window: int = 0
    """Each query sees only the last ``sliding_window`` keys (itself included); 0 = all."""
    rope_scaling: str = "none"
    """``none``, ``llama3`` (Llama 3.x frequency interpolation) or ``longrope`` (Phi-3/PhiMoE)."""
    rope_factor: float = 8.0
    """llama3: the frequency divisor of the long wavelengths."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max / this are divided by ``rope_factor``."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max / this are kept; between them interpolated."""
    rope_original_max_seq_len: int = 8192
    """llama3 / longrope: the context length of pretraining (``original_max_position_embeddings``)."""
    rope_short_factor: tuple[float, ...] = ()
    """longrope: per-frequency divisors (head_dim // 2 of them) up to the original length."""
    rope_long_factor: tuple[float, ...] = ()
    """longrope: per-frequency divisors beyond the original length."""
    rope_short_mscale: float = 1.0
    """longrope: cos/sin scale up to the original length."""
    rope_long_mscale: float = 1.0
    """longrope: cos/sin scale beyond the original length."""

    def __post_init__(self) -> None:
        if self.n_kv_heads <= 0:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden <= 0:
            hidden = int(8 * self.dim / 3)
            self.ffn_hidden = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.padded_vocab_size <= 0:
            self.padded_vocab_size = self.vocab_size
        self._check_features()
        if self.head_dim <= 0 and self.dim % self.n_heads:
            raise ConfigError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}: set "
                f"model.n_heads to a divisor of {self.dim} (e.g. "
                f"{nearest_divisor(self.dim, self.n_heads)}) or change model.dim"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads="
                f"{self.n_kv_heads}: set model.n_kv_heads to a divisor of {self.n_heads} (e.g. "
                f"{nearest_divisor(self.n_heads, self.n_kv_heads)})"
            )
        if self.head_dim <= 0:
            self.head_dim = self.dim // self.n_heads

    def _check_features(self) -> None:
        """The string-valued feature fields and longrope's factor lists."""
        if self.norm not in NORMS:
            raise ConfigError(f"model.norm={self.norm!r}: use one of {', '.join(NORMS)}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(
                f"model.rope_scaling={self.rope_scaling!r}: use one of {', '.join(ROPE_SCALINGS)}"
            )
        self.rope_short_factor = tuple(float(f) for f in self.rope_short_factor)
        self.rope_long_factor = tuple(float(f) for f in self.rope_long_factor)
        unused = {
            "none": ROPE_FIELDS,
            "llama3": ROPE_FIELDS[4:],
            "longrope": ROPE_FIELDS[:3],
        }[self.rope_scaling]
        for key in unused:
            if getattr(self, key) != getattr(GPTConfig, key, ()):
                raise ConfigError(
                    f"model.{key}={getattr(self, key)} has no effect with model.rope_scaling="
                    f"{self.rope_scaling}, so it would be ignored: remove it"
                )
        if self.rope_scaling != "longrope":
            return
        half = (self.head_dim or self.dim // self.n_heads) // 2
        for key in ("rope_short_factor", "rope_long_factor"):
            if len(getattr(self, key)) != half:
                raise ConfigError(
                    f"model.{key} has {len(getattr(self, key))} values; model.rope_scaling="
                    f"longrope needs head_dim // 2 = {half}"
                )


NORMS = ("rmsnorm", "layernorm")
ROPE_SCALINGS = ("none", "llama3", "longrope")
ROPE_FIELDS = (
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_seq_len",
    "rope_short_factor",
    "rope_long_factor",
    "rope_short_mscale",
    "rope_long_mscale",
)
"""The scaling parameters: the first 4 are llama3's, the last 5 longrope's (they share
``rope_original_max_seq_len``)."""


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: GPTConfig) -> nn.Module:
    """The block/final norm ``cfg.norm`` names: ``RMSNorm`` or ``nn.LayerNorm`` (with bias)."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
    return RMSNorm(cfg.dim, cfg.norm_eps)


def rope_tables(
    head_dim: int, positions: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``positions``.

    Args:
        head_dim: per-head size (even).
        positions: (S,) integer global positions, or (B, S) per sequence (document masking:
            positions restart at every document).
        theta: rotary base.

    Returns:
        cos_SD, sin_SD of shape (S, head_dim // 2) (or (B, S, head_dim // 2)), fp32.
    """
    inv = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    ang_SD = positions.to(torch.float32)[..., None] * inv
    return ang_SD.cos(), ang_SD.sin()


def rope_inv_freq(cfg: GPTConfig, seq_len: int = 0) -> tuple[torch.Tensor, float]:
    """(head_dim // 2,) fp32 inverse frequencies and the cos/sin scale of ``cfg.rope_scaling``.

    ``llama3`` follows Meta's ``apply_scaling`` (transformers' ``_compute_llama3_parameters``);
    ``longrope`` (Phi-3 / PhiMoE) divides the frequencies by ``rope_long_factor`` and scales
    cos/sin by ``rope_long_mscale`` when ``seq_len`` exceeds ``rope_original_max_seq_len``, else
    by the short ones. ``seq_len``: the forward's length (largest position + 1), longrope only.
    """
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if cfg.rope_scaling == "llama3":
        return _llama3_inv_freq(inv, cfg), 1.0
    if cfg.rope_scaling == "longrope":
        long = seq_len > cfg.rope_original_max_seq_len
        ext = torch.tensor(cfg.rope_long_factor if long else cfg.rope_short_factor)
        inv = 1.0 / (ext * cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        return inv, cfg.rope_long_mscale if long else cfg.rope_short_mscale
    return inv, 1.0


def _llama3_inv_freq(inv: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """Long wavelengths divided by ``rope_factor``, short ones kept, the band between them
    interpolated (Llama 3.1's ``apply_scaling``)."""
    old, factor = cfg.rope_original_max_seq_len, cfg.rope_factor
    lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled)


def model_rope_tables(cfg: GPTConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_tables`` with ``cfg``'s scaling: cos/sin (S, D/2) or (B, S, D/2), fp32."""
    if cfg.rope_scaling == "none":
        return rope_tables(cfg.head_dim, positions, cfg.rope_theta)
    seq_len = int(positions.max()) + 1 if cfg.rope_scaling == "longrope" else 0
    inv, scale = rope_inv_freq(cfg, seq_len)
    ang = positions.to(torch.float32)[..., None] * inv.to(positions.device)
    return ang.cos() * scale, ang.sin() * scale


def apply_rope(x_BSHD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of every head by the position's angle."""
    x = x_BSHD.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    if cos_SD.ndim == 2:  # one table for the batch
        c, s = cos_SD[None, :, None, :], sin_SD[None, :, None, :]
    else:  # (B, S, D/2): per-sequence positions
        c, s = cos_SD[:, :, None, :], sin_SD[:, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.type_as(x_BSHD)


def document_ids(x_BS: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, S) index of the document each token belongs to; an EOS token ends its document."""
    eos = (x_BS == eos_id).long()
    return eos.cumsum(1) - eos


def document_positions(doc_BS: torch.Tensor) -> torch.Tensor:
    """(B, S) position of each token inside its document (0 at every document's start)."""
    idx = torch.arange(doc_BS.shape[1], device=doc_BS.device).expand_as(doc_BS)
    starts = torch.ones_like(doc_BS, dtype=torch.bool)
    starts[:, 1:] = doc_BS[:, 1:] != doc_BS[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    return idx - first


def document_mask(doc_BS: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) boolean attention mask: causal, and only within the query's document."""
    S = doc_BS.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_BS.device).tril()
    same = doc_BS[:, :, None] == doc_BS[:, None, :]
    return (same & causal)[:, None]


def window_mask(
    S: int, window: int, device: torch.device, start: int = 0, T: int = 0
) -> torch.Tensor:
    """(S, T) bool: query ``start + i`` sees key j iff ``start + i - window < j <= start + i``
    (transformers' sliding-window causal mask); T defaults to S."""
    pos_q = torch.arange(start, start + S, device=device)[:, None]
    pos_k = torch.arange(T or S, device=device)[None, :]
    return (pos_k <= pos_q) & (pos_k > pos_q - window)


class CoreAttention(nn.Module):
    """Causal scaled-dot-product attention on (B, S, H, D) tensors; kv may have fewer heads.

    ``attn_mask`` (B, 1, S, S) bool (``document_mask``) replaces the causal mask: packed
    documents do not attend to each other. It spans the whole sequence, so under Ulysses (which
    hands this core the full sequence for a subset of heads) the same mask applies."""

    def __init__(self, window: int = 0) -> None:
        super().__init__()
        self.window = window
        """Sliding window: query i sees keys i - window < j <= i (0: every earlier key)."""

    def forward(
        self,
        q_BSHD: torch.Tensor,
        k_BSKD: torch.Tensor,
        v_BSKD: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSKD, v_BSKD))
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if self.window > 0:
            band = window_mask(q.shape[2], self.window, q.device)
            attn_mask = band if attn_mask is None else attn_mask & band
        if attn_mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return o.transpose(1, 2)


class LayerKV:
    """One layer's cached keys and values, (B, T_max, K, D) buffers filled up to ``length``."""

    def __init__(self, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor) -> None:
        self.k_BTKD, self.v_BTKD = k_BTKD, v_BTKD
        self.length = 0

    def append(
        self, k_BSKD: torch.Tensor, v_BSKD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store S new positions; returns all cached keys/values (B, length, K, D) and the
        position of the first new one."""
        start, end = self.length, self.length + k_BSKD.shape[1]
        if end > self.k_BTKD.shape[1]:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.k_BTKD.shape[1]}")
        self.k_BTKD[:, start:end] = k_BSKD
        self.v_BTKD[:, start:end] = v_BSKD
        self.length = end
        return self.k_BTKD[:, :end], self.v_BTKD[:, :end], start


class KVCache:
    """Keys and values of every layer for incremental decoding (prefill, then one step per token).

    Example::

        cache = KVCache.for_model(model, batch=1, max_len=128)
        logits = model(prompt_BS, cache=cache)        # prefill: positions 0..S-1
        logits = model(next_B1, cache=cache)          # decode: position S, reuses 0..S-1
    """

    def __init__(self, layers: dict[str, LayerKV]) -> None:
        self.layers = layers

    @classmethod
    def for_model(
        cls, model: GPT, batch: int, max_len: int, dtype: torch.dtype | None = None
    ) -> KVCache:
        """Empty buffers for every block of ``model`` (on its device, in its dtype)."""
        cfg, ref = model.cfg, next(model.parameters())
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        kw = {"dtype": dtype or ref.dtype, "device": ref.device}
        return cls(
            {k: LayerKV(torch.zeros(shape, **kw), torch.zeros(shape, **kw)) for k in model.layers}
        )

    @property
    def start_pos(self) -> int:
        """Positions cached so far: the rotary position of the next token."""
        return next(iter(self.layers.values())).length if self.layers else 0


def cached_attention(
    q_BSHD: torch.Tensor,
    k_BTKD: torch.Tensor,
    v_BTKD: torch.Tensor,
    start_pos: int,
    window: int = 0,
) -> torch.Tensor:
    """Causal attention of S queries at positions ``start_pos..`` over T cached keys (0..T-1).

    ``CoreAttention``'s ``is_causal`` aligns the mask top-left, which is wrong once T > S, so
    the mask here is explicit: query i sees keys j <= start_pos + i.
    """
    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BTKD, v_BTKD))
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    S, T = q.shape[2], k.shape[2]
    mask_ST = window_mask(S, window or T + S, q.device, start_pos, T)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_ST)
    return o.transpose(1, 2)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.head_dim, bias = cfg.head_dim, cfg.attention_bias
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=bias)
        self.core = CoreAttention(cfg.sliding_window)

    def forward(
        self,
        x_BSE: torch.Tensor,
        cos_SD: torch.Tensor,
        sin_SD: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv: LayerKV | None = None,
    ) -> torch.Tensor:
        """``kv``: this layer's cache (inference); the new keys/values are appended to it."""
        B, S, _ = x_BSE.shape
        q = self.wq(x_BSE).view(B, S, -1, self.head_dim)
        k = self.wk(x_BSE).view(B, S, -1, self.head_dim)
        v = self.wv(x_BSE).view(B, S, -1, self.head_dim)
        q, k = apply_rope(q, cos_SD, sin_SD), apply_rope(k, cos_SD, sin_SD)
        if kv is not None:
            k_all, v_all, start = kv.append(k, v)
            o_BSHD = cached_attention(q, k_all, v_all, start, self.core.window)
        elif attn_mask is None:
            o_BSHD = self.core(q, k, v)
        else:
            o_BSHD = self.core(q, k, v, attn_mask)
        return self.wo(o_BSHD.reshape(B, o_BSHD.shape[1], -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = self.make_ffn(cfg)

    def make_ffn(self, cfg: GPTConfig) -> nn.Module:
        return FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(
        self,
        x: torch.Tensor,
        cos_SD: torch.Tensor,
        sin_SD: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv: LayerKV | None = None,
    ) -> torch.Tensor:
        h = x + self.attend(self.attention_norm(x), cos_SD, sin_SD, kv, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def attend(
        self,
        x: torch.Tensor,
        cos_SD: torch.Tensor,
        sin_SD: torch.Tensor,
        kv: LayerKV | None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention call; without a cache exactly the training call (three positional
        inputs, which tensor parallelism's ``PrepareModuleInput`` plan expects; the document
        mask goes as a keyword, which that plan passes through)."""
        if kv is not None:
            return self.attention(x, cos_SD, sin_SD, kv=kv)
        if attn_mask is not None:
            return self.attention(x, cos_SD, sin_SD, attn_mask=attn_mask)
        return self.attention(x, cos_SD, sin_SD)


class GPT(nn.Module):
    """Decoder-only language model.

    Example::

        model = GPT(GPTConfig(dim=64, n_layers=2, n_heads=4))
        logits_BSV = model(tokens_BS)
    """

    block_cls = Block
    stage_extras: tuple[str, ...] = ()
    """What a pipeline stage passes on beside the hidden state, in order: ``"keys"`` (the
    (B, S) int64 token keys, also an input of the first stage) and ``"aux"`` (a 0-d fp32 loss
    in the graph). ``parallelism.pipeline.StageShapes`` declares them to torch's pipelining."""
    position_offset = 0
    """Global position of this module's first token when ``forward`` gets no ``positions`` (set
    on pipeline stages of a sequence-parallel layout, whose inputs carry no positions)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): self.block_cls(cfg) for i in range(cfg.n_layers)})
        self.norm: nn.Module | None = make_norm(cfg)
        self.output: nn.Linear | None = nn.Linear(
            cfg.dim, cfg.padded_vocab_size, bias=cfg.lm_head_bias
        )
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        **block_kwargs: Any,
    ) -> torch.Tensor:
        """Args:
            x: (B, S) token ids, or (B, S, E) hidden states on a stage without embeddings.
            positions: (S,) global positions (default ``arange(S)``, or
                ``arange(start_pos, start_pos + S)`` with a cache), or (B, S) per sequence
                (document masking).
            cache: inference only: the ``KVCache`` of the tokens before ``x``
                (``cache.start_pos`` of them); ``x``'s keys/values are appended to it.
            block_kwargs: passed to every block: ``attn_mask`` (``document_mask``), and what a
                subclass's blocks take besides.

        Returns:
            (B, S, V) logits (V = padded vocabulary), or (B, S, E) hidden states on a stage
            without the output projection.
        """
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        if positions is None:
            start = self.position_offset if cache is None else cache.start_pos
            positions = torch.arange(start, start + h.shape[1], device=h.device)
        cos_SD, sin_SD = model_rope_tables(self.cfg, positions)
        for key, layer in self.layers.items():
            if cache is None:
                h = layer(h, cos_SD, sin_SD, **block_kwargs)
            else:
                h = layer(h, cos_SD, sin_SD, kv=cache.layers[key], **block_kwargs)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    # -- initialisation ---------------------------------------------------------------------
    def init_tensor(
        self, name: str, shape: tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """Initial value of parameter ``name`` (canonical FQN) with its global ``shape``.

        Depends only on the name, shape and generator, never on the layout. Vocabulary rows
        beyond ``vocab_size`` (tensor-parallel padding) are zero.
        """
        cfg = self.cfg
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith(".bias"):  # norms, attention and lm_head biases start at zero
            return torch.zeros(shape)
        std = cfg.init_std
        if name.endswith(("wo.weight", "w2.weight")):
            std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        if name in ("tok_embeddings.weight", "output.weight") and shape[0] > cfg.vocab_size:
            t = torch.zeros(shape)
            t[: cfg.vocab_size].normal_(0.0, std, generator=generator)
            return t
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        return n


def build_gpt(model_args: object) -> GPT:
    """Build a GPT from ``GPTArgs`` (or any object with the same fields)."""
    fields = GPTConfig.__dataclass_fields__
    kwargs = {k: getattr(model_args, k) for k in fields if hasattr(model_args, k)}
    return GPT(GPTConfig(**kwargs))
