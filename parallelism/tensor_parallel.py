"""Megatron-style tensor parallelism for the plain GPT, on DTensor's parallel styles.

Owns: the TP plan (Shoeybi et al., "Megatron-LM", 2019; sequence parallelism from Korthikanti et
al., "Reducing Activation Recomputation in Large Transformer Models", 2022), vocabulary padding to
a multiple of tp, and the vocab-parallel cross-entropy. Follows torchtitan's ``apply_tp``.

- Column-parallel ``wq/wk/wv`` and ``w1/w3``, row-parallel ``wo`` and ``w2``: one all-reduce in
  forward and one in backward per block half (Megatron's f/g operators are DTensor
  redistributions inside ``ColwiseParallel``/``RowwiseParallel``). A block whose
  ``feed_forward`` is not the dense SwiGLU (the MoE block) keeps it untouched here;
  ``parallelism.expert_parallel`` splits the experts.
- Vocab-parallel embedding: ``RowwiseParallel(input_layouts=Replicate())`` on ``tok_embeddings``
  (each rank owns a slice of the rows, masked lookups are summed).
- Vocab-parallel output: ``ColwiseParallel(output_layouts=Shard(-1))`` keeps the logits sharded
  over the vocabulary; ``vocab_parallel_cross_entropy`` runs under ``loss_parallel`` so the
  softmax is reduced across ranks without ever gathering full-vocabulary logits.
- Optional sequence parallelism (``parallel.sequence_parallel_norms``): norms run on sequence
  shards (``SequenceParallel``), attention/FFN inputs are all-gathered and the row-parallel
  outputs are reduce-scattered instead of all-reduced. DTensor turns the norms' replicated weights'
  partial gradients into an all-reduce over tp (the Megatron trap of missing that reduction).

Written here (torch lacks it): padding the vocabulary to a multiple of tp and masking the padded
logit columns to -inf, so the padding never reaches the softmax, the loss or the gradients; and a
forward pre-hook that passes the *global* positions to the model when its hidden states arrive as
sequence shards.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from parallelism.dims import LayoutError


def padded_vocab(vocab_size: int, tp: int) -> int:
    """Smallest multiple of ``tp`` that is >= ``vocab_size``."""
    return -(-vocab_size // tp) * tp


def validate_tensor_parallel(cfg: Any, tp: int, seq_len: int, parallel: Any) -> None:
    """Reject models that do not split over ``tp`` ranks; messages name the field and the fix.

    Args:
        cfg: the built model config (``models.gpt.GPTConfig``: derived sizes already resolved).
        seq_len: ``train.seq_len``; parallel: ``ParallelArgs``.
    """
    if tp == 1:
        return
    for name, value in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads)):
        if value % tp:
            raise LayoutError(
                f"model.{name}={value} is not divisible by parallel.tp={tp}: tensor parallelism "
                f"splits whole heads; choose parallel.tp dividing {value}"
            )
    if cfg.ffn_hidden % tp:
        raise LayoutError(
            f"model.ffn_hidden={cfg.ffn_hidden} (SwiGLU hidden size) is not divisible by "
            f"parallel.tp={tp}: set model.ffn_hidden (or model.multiple_of) to a multiple of tp"
        )
    if parallel.sequence_parallel_norms and seq_len % tp:
        raise LayoutError(
            f"train.seq_len={seq_len} is not divisible by parallel.tp={tp}: sequence-parallel "
            "norms shard the sequence; use a multiple of tp or parallel.sequence_parallel_norms=false"
        )


def pad_vocab_(model: nn.Module, tp: int) -> None:
    """Grow ``tok_embeddings``/``output`` (on the meta device) to a multiple of ``tp`` rows.

    ``GPT.init_tensor`` zero-fills rows >= vocab_size, the loss masks their logits, so those rows
    get zero gradients and stay zero (they never change the loss or the trained weights).
    """
    cfg = model.cfg
    vp = padded_vocab(cfg.vocab_size, tp)
    if vp == cfg.padded_vocab_size:
        return
    if vp < cfg.padded_vocab_size and cfg.padded_vocab_size % tp == 0:
        return
    cfg.padded_vocab_size = vp
    dev = next(model.parameters()).device
    if model.tok_embeddings is not None:
        model.tok_embeddings = nn.Embedding(vp, cfg.dim, device=dev)
    if model.output is not None:
        model.output = nn.Linear(cfg.dim, vp, bias=False, device=dev)
        if cfg.tie_embeddings and model.tok_embeddings is not None:
            model.output.weight = model.tok_embeddings.weight


def _block_plan(sp: bool, dense_ffn: bool = True) -> dict[str, Any]:
    """The block's TP plan; ``dense_ffn=False`` leaves ``feed_forward`` alone (an MoE block's
    experts are split by ``parallelism.expert_parallel``)."""
    seq = Shard(1) if sp else Replicate()
    plan: dict[str, Any] = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=seq),
    }
    if dense_ffn:
        plan["feed_forward.w1"] = ColwiseParallel()
        plan["feed_forward.w3"] = ColwiseParallel()
        plan["feed_forward.w2"] = RowwiseParallel(output_layouts=seq)
    # One input preparation per block half: the column-parallel projections then receive a
    # replicated DTensor, so their input gradients add up as one Partial and are reduced once
    # (Megatron's single "f" all-reduce, or one reduce-scatter with SP) instead of once per
    # projection (3x for q/k/v, 2x for gate/up) as separate ColwiseParallel inputs would be.
    plan["attention"] = PrepareModuleInput(
        input_layouts=(seq, None, None),
        desired_input_layouts=(Replicate(), None, None),
        use_local_output=False,
    )
    if dense_ffn:
        plan["feed_forward"] = PrepareModuleInput(
            input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_output=False
        )
    if sp:
        plan["attention_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
    return plan


def _global_positions_hook(tp: int):
    """Forward pre-hook: hidden-state inputs are sequence shards (B, S/tp, E); pass positions
    0..S-1 so rotary tables cover the whole (gathered) sequence."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("positions") is None and len(args) < 2:
            x = args[0]
            s = x.shape[1] * (tp if x.ndim == 3 else 1)
            kwargs = {**kwargs, "positions": torch.arange(s, device=x.device)}
        return args, kwargs

    return hook


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: Any, sequence_parallel_norms: bool = False
) -> nn.Module:
    """Shard a (meta-device, possibly pipeline-split) GPT over ``tp_mesh`` in place.

    Args:
        model: ``models.gpt.GPT``; ``tok_embeddings``/``norm``/``output`` may be ``None``.
        tp_mesh: 1-D DeviceMesh of the tensor-parallel ranks.
        sequence_parallel_norms: shard norms over the sequence (Megatron SP).

    Returns:
        The same module. Its logits are a DTensor (B, S, V_padded) sharded on the vocabulary.
    """
    tp = tp_mesh.size()
    sp = sequence_parallel_norms
    seq = Shard(1) if sp else Replicate()
    pad_vocab_(model, tp)
    top: dict[str, Any] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.norm is not None and sp:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(
            input_layouts=seq, output_layouts=Shard(-1), use_local_output=False
        )
    if top:
        parallelize_module(model, tp_mesh, top)
        tied = model.cfg.tie_embeddings and model.tok_embeddings is not None
        if tied and model.output is not None:
            # each plan distributed its own copy; both are Shard(0) over the vocabulary rows
            model.output.weight = model.tok_embeddings.weight
    for block in model.layers.values():
        dense_ffn = isinstance(getattr(block.feed_forward, "w1", None), nn.Linear)
        parallelize_module(block, tp_mesh, _block_plan(sp, dense_ffn))
    if sp:
        model.register_forward_pre_hook(_global_positions_hook(tp), with_kwargs=True)
    return model


def tp_loss_context(tp: int) -> AbstractContextManager:
    """``loss_parallel()`` when logits are vocab-sharded (must enclose forward *and* backward)."""
    return loss_parallel() if tp > 1 else nullcontext()


def vocab_parallel_cross_entropy(
    logits_BSV: DTensor, targets_BS: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Mean cross-entropy of vocab-sharded logits; no rank holds more than V_padded/tp columns.

    Padded columns (global index >= ``vocab_size``) are set to -inf before the distributed
    softmax, so the result equals the unpadded single-process loss. Call inside
    ``tp_loss_context`` (forward and backward).

    Args:
        logits_BSV: DTensor (B, S, V_padded), placements ``[Shard(-1)]`` on the tp mesh.
        targets_BS: (B, S) int64 token ids (< vocab_size), replicated over tp.
        vocab_size: the real vocabulary size.

    Returns:
        Scalar fp32 loss as a plain tensor (identical on every tp rank).
    """
    mesh = logits_BSV.device_mesh
    local = logits_BSV.to_local().float()
    v_local = local.shape[-1]
    start = mesh.get_local_rank() * v_local
    if start + v_local > vocab_size:
        cols = torch.arange(start, start + v_local, device=local.device)
        local = local.masked_fill(cols >= vocab_size, float("-inf"))
    logits = DTensor.from_local(local, mesh, [Shard(-1)], run_check=False)
    targets = DTensor.from_local(targets_BS.flatten(), mesh, [Replicate()], run_check=False)
    loss = F.cross_entropy(logits.flatten(0, 1), targets)
    return loss.to_local() if isinstance(loss, DTensor) else loss
