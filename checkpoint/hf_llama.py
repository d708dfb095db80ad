"""Hugging Face Llama weights -> Lattice's GPT (``models/gpt.py``): names, config, RoPE order.

Hand-written because the mapping is small and exact, and transformers has no converter *to* a
Meta-style layout (its ``convert_llama_weights_to_hf.py`` goes the other way). Three things
differ between the two models, none of them in the math:

- Names: ``model.layers.{i}.self_attn.q_proj`` -> ``layers.{i}.attention.wq``, ``mlp.gate_proj``
  / ``up_proj`` / ``down_proj`` -> ``feed_forward.w1`` / ``w3`` / ``w2``, ``input_layernorm`` /
  ``post_attention_layernorm`` -> ``attention_norm`` / ``ffn_norm``, ``model.embed_tokens`` ->
  ``tok_embeddings``, ``model.norm`` -> ``norm``, ``lm_head`` -> ``output``.
- RoPE order: Lattice rotates interleaved pairs ``(x[2i], x[2i+1])`` of a head (Meta's order);
  HF rotates the halves ``(x[i], x[i + D/2])`` (``rotate_half``). HF's converter permutes each
  head's rows of ``wq``/``wk`` with ``view(H, D/2, 2, E).transpose(1, 2)``; we apply the inverse,
  ``view(H, 2, D/2, E).transpose(1, 2)``, so the same weights give the same attention scores.
- Config: ``hidden_size`` -> ``dim``, ``intermediate_size`` -> ``ffn_hidden`` (explicit, so the
  8/3-rule is not used), ``rms_norm_eps`` -> ``norm_eps``, ``rope_parameters["rope_theta"]``
  (``rope_theta`` before transformers 5) -> ``rope_theta``, ``tie_word_embeddings`` ->
  ``tie_embeddings``.

Checkpoint-side module: the import direction returns plain ``GPTConfig`` keyword arguments;
the export direction (used by ``python -m checkpoint.export --format hf``) reads the derived
sizes off the tensors. It imports no model code (checkpoint knows models only through the
family's adapter).
Features Lattice's GPT lacks (biases, rope scaling, another activation, a head size other than
``hidden_size / heads``) raise ``ValueError`` naming the config field.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _rope_theta(config: Any) -> float:
    """``rope_parameters`` (transformers >= 5) or ``rope_theta``; only the default rope type."""
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope_parameters.rope_type={kind!r}: only 'default' RoPE is supported")
    return float(params.get("rope_theta", _get(config, "rope_theta", 10000.0)))


def gpt_config_kwargs(config: Any) -> dict[str, Any]:
    """``GPTConfig`` keyword arguments for a ``LlamaConfig`` (or its ``to_dict()``)."""
    for field in ("attention_bias", "mlp_bias"):
        if _get(config, field, False):
            raise ValueError(f"{field}=True: Lattice's GPT has no biases")
    if _get(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={_get(config, 'hidden_act')!r}: only 'silu' (SwiGLU)")
    dim, heads = int(_get(config, "hidden_size")), int(_get(config, "num_attention_heads"))
    head_dim = _get(config, "head_dim") or dim // heads
    if head_dim * heads != dim:
        raise ValueError(f"head_dim={head_dim} != hidden_size/num_attention_heads={dim // heads}")
    return {
        "vocab_size": int(_get(config, "vocab_size")),
        "dim": dim,
        "n_layers": int(_get(config, "num_hidden_layers")),
        "n_heads": heads,
        "n_kv_heads": int(_get(config, "num_key_value_heads") or heads),
        "ffn_hidden": int(_get(config, "intermediate_size")),
        "norm_eps": float(_get(config, "rms_norm_eps", 1e-6)),
        "rope_theta": _rope_theta(config),
        "max_seq_len": int(_get(config, "max_position_embeddings", 2048)),
        "tie_embeddings": bool(_get(config, "tie_word_embeddings", False)),
    }


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split row order of a (H*D, E) ``q_proj``/``k_proj`` -> interleaved pairs.

    Row ``h*D + j`` (j < D/2) of HF pairs with row ``h*D + j + D/2``; in Lattice they become rows
    ``h*D + 2j`` and ``h*D + 2j + 1``. Inverse of HF's ``permute`` in
    ``convert_llama_weights_to_hf.py``.
    """
    rows, cols = w.shape
    d_half = rows // n_heads // 2
    return w.view(n_heads, 2, d_half, cols).transpose(1, 2).reshape(rows, cols)


def rename(hf_name: str) -> str | None:
    """Lattice's name for an HF Llama parameter, or None for buffers it does not keep."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 3:
        tail = ".".join(parts[3:])
        if tail in LAYER_NAMES:
            return f"layers.{parts[2]}.{LAYER_NAMES[tail]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"unknown Llama parameter {hf_name!r}")


def llama_to_lattice(
    state_dict: Mapping[str, torch.Tensor], config: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert an HF ``LlamaForCausalLM`` state dict for ``models.gpt.GPT``.

    Args:
        state_dict: ``model.state_dict()`` (or safetensors contents) of ``LlamaForCausalLM``.
        config: its ``LlamaConfig`` (or the dict of ``config.json``).

    Returns:
        (``GPTConfig`` kwargs, state dict with Lattice names): ``GPT(GPTConfig(**kw))
        .load_state_dict(sd)`` then gives the same logits as the HF model.

    Example::

        kw, sd = llama_to_lattice(hf.state_dict(), hf.config)
        model = GPT(GPTConfig(**kw)); model.load_state_dict(sd)
    """
    kw = gpt_config_kwargs(config)
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        new = rename(name)
        if new is None:
            continue
        out[new] = to_lattice_tensor(new, t, kw).detach().clone()
    if kw["tie_embeddings"]:
        out["output.weight"] = out["tok_embeddings.weight"]
    return kw, out


def to_lattice_tensor(name: str, t: torch.Tensor, kw: Mapping[str, Any]) -> torch.Tensor:
    """An HF tensor in Lattice's layout: q/k rows in interleaved RoPE order (``kw``: the
    ``GPTConfig`` kwargs of ``gpt_config_kwargs``)."""
    head_dim = int(kw["dim"]) // int(kw["n_heads"])
    if name.endswith("attention.wq.weight"):
        return unpermute_rope(t, int(kw["n_heads"]))
    if name.endswith("attention.wk.weight"):
        return unpermute_rope(t, t.shape[0] // head_dim)
    return t


# -- Lattice -> Hugging Face (export) -----------------------------------------------------------
LATTICE_NAMES = {v: k for k, v in LAYER_NAMES.items()}
LATTICE_TOP = {v: k for k, v in TOP_NAMES.items()}


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair row order of a (H*D, E) ``wq``/``wk`` -> HF's half split (HF's own
    ``permute`` in ``convert_llama_weights_to_hf.py``; the inverse of ``unpermute_rope``)."""
    rows, cols = w.shape
    d_half = rows // n_heads // 2
    return w.view(n_heads, d_half, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_name(lattice_name: str) -> str:
    """HF Llama's name for a Lattice GPT parameter (inverse of ``rename``)."""
    if lattice_name in LATTICE_TOP:
        return LATTICE_TOP[lattice_name]
    parts = lattice_name.split(".")
    tail = ".".join(parts[2:])
    if parts[0] == "layers" and tail in LATTICE_NAMES:
        return f"model.layers.{parts[1]}.{LATTICE_NAMES[tail]}"
    raise ValueError(f"no Llama name for Lattice parameter {lattice_name!r}")


def llama_config(
    model: Mapping[str, Any], ffn_hidden: int, n_kv_heads: int, dtype: str = "float32"
) -> dict[str, Any]:
    """``config.json`` of ``LlamaForCausalLM`` for a Lattice gpt ``model.*`` config (as saved in
    a checkpoint's train state); the inverse of ``gpt_config_kwargs``. The derived sizes
    (``ffn_hidden``, ``n_kv_heads``) are read off the exported tensors by the caller, so no
    model code is needed here."""
    dim, heads = int(model["dim"]), int(model["n_heads"])
    theta = float(model.get("rope_theta", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(model["vocab_size"]),
        "hidden_size": dim,
        "intermediate_size": int(ffn_hidden),
        "num_hidden_layers": int(model["n_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(n_kv_heads),
        "head_dim": dim // heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(model.get("max_seq_len", 2048)),
        "rms_norm_eps": float(model.get("norm_eps", 1e-5)),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": bool(model.get("tie_embeddings", False)),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }


def to_hf_tensor(name: str, t: torch.Tensor, model: Mapping[str, Any]) -> tuple[str, torch.Tensor]:
    """One Lattice tensor -> (HF name, HF tensor), RoPE rows permuted for q/k (``model``: the
    saved ``model.*`` config)."""
    heads = int(model["n_heads"])
    head_dim = int(model["dim"]) // heads
    if name.endswith("attention.wq.weight"):
        t = permute_rope(t, heads)
    elif name.endswith("attention.wk.weight"):
        t = permute_rope(t, t.shape[0] // head_dim)
    return hf_name(name), t


# -- reading a Hugging Face folder (import) -----------------------------------------------------
class HFFolder:
    """A ``save_pretrained`` folder: ``config.json`` and ``model.safetensors`` or shards with
    ``model.safetensors.index.json``. Tensors are read one at a time (``get``), never the whole
    model."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(
                f"{cfg} is missing: model.from_hf needs a save_pretrained folder"
            )
        self.config: dict[str, Any] = json.loads(cfg.read_text())
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.files = dict(json.loads(index.read_text())["weight_map"])
            for shard in sorted(set(self.files.values())):
                if not (self.path / shard).is_file():
                    raise FileNotFoundError(
                        f"{self.path / shard} is missing (listed in {index.name}): copy the "
                        "whole folder"
                    )
        elif (self.path / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                self.files = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(
                f"{self.path} has no model.safetensors or model.safetensors.index.json"
            )
        self.bytes_read = 0
        """Tensor bytes ``read_local`` has read so far (what this rank took from the files)."""

    @property
    def architecture(self) -> str:
        return ",".join(self.config.get("architectures") or ["?"])

    def get(self, hf_key: str) -> torch.Tensor:
        from safetensors import safe_open

        if hf_key not in self.files:
            raise KeyError(f"{self.path} holds no tensor {hf_key!r}")
        with safe_open(str(self.path / self.files[hf_key]), "pt") as f:
            return f.get_tensor(hf_key)

    def lattice_tensor(self, lattice_name: str) -> torch.Tensor:
        """The whole Lattice GPT tensor ``lattice_name`` (RoPE rows in Lattice's order)."""
        return to_lattice_tensor(lattice_name, self.get(self.key(lattice_name)), self.kwargs)

    def key(self, lattice_name: str) -> str:
        """The HF key that holds ``lattice_name`` (``embed_tokens`` for a tied ``lm_head``)."""
        key = hf_name(lattice_name)
        if key == "lm_head.weight" and key not in self.files and self.kwargs["tie_embeddings"]:
            key = "model.embed_tokens.weight"
        return self.present(key, lattice_name)

    def present(self, key: str, lattice_name: str) -> str:
        """``key``, or a KeyError naming the file (or index) that lacks it."""
        if key not in self.files:
            index = "model.safetensors.index.json" if len(set(self.files.values())) > 1 else ""
            where = f"{self.path / index}" if index else f"{self.path}"
            raise KeyError(f"{where} holds no tensor {key!r} (needed for {lattice_name})")
        return key

    def shape(self, lattice_name: str) -> tuple[int, ...]:
        """The stored shape of ``lattice_name``'s HF tensor, from its file's header."""
        from checkpoint.safetensors_slices import tensor_shape

        key = self.key(lattice_name)
        return tensor_shape(self.path / self.files[key], key)

    def read_local(self, lattice_name: str, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``lattice_tensor(lattice_name)[index]`` reading only those bytes (``index``: global
        indices per dimension, as ``parallelism.init.local_index`` gives a rank's shard).

        Rows past the stored ones (vocabulary padding) come back as zeros; ``wq``/``wk`` rows
        are mapped through the RoPE permutation (Lattice row ``h*D + 2j + k`` is HF row
        ``h*D + k*D/2 + j``), so a shard of whole or partial heads reads just its rows.
        """
        from checkpoint.safetensors_slices import read_box

        key = self.key(lattice_name)
        stored = self.shape(lattice_name)
        rows = index[0]
        keep = rows < stored[0]
        hf_rows = self._hf_rows(lattice_name, rows[keep])
        part = read_box(self.path / self.files[key], key, (hf_rows, *index[1:]))
        self.bytes_read += part.numel() * part.element_size()
        if bool(keep.all()):
            return part
        out = part.new_zeros(rows.numel(), *part.shape[1:])
        out[keep] = part
        return out

    def _hf_rows(self, lattice_name: str, rows: torch.Tensor) -> torch.Tensor:
        if not lattice_name.endswith(("attention.wq.weight", "attention.wk.weight")):
            return rows
        head_dim = int(self.kwargs["dim"]) // int(self.kwargs["n_heads"])
        head, within = rows // head_dim, rows % head_dim
        return head * head_dim + (within % 2) * (head_dim // 2) + within // 2

    @functools.cached_property
    def kwargs(self) -> dict[str, Any]:
        """The ``GPTConfig`` kwargs of ``config.json`` (computed once)."""
        return gpt_config_kwargs(self.config)
