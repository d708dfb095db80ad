"""Hugging Face architectures <-> Lattice: Llama, Mixtral and PhiMoE (GRIN-MoE).

Hand-written, like ``checkpoint/hf_llama.py`` (which owns the Llama names and the RoPE row
permutation this module reuses): the three architectures share Llama's attention, so one table
per architecture says what differs, and transformers has no converter to a Meta-style layout.
The ``architectures`` entry of ``config.json`` picks the mapping (``ARCHITECTURES``); anything
else is refused, naming it.

- ``model_kwargs(config)``: the ``model.*`` fields of ``config.json`` (``GPTArgs`` /
  ``MoEArgs`` names), including the features Llama 3 and PhiMoE need: RoPE scaling (``llama3``,
  ``longrope``), ``layernorm`` norms with biases, attention and lm_head biases, an explicit
  ``head_dim``, ``sliding_window``, the MoE router and jitters. A config feature Lattice lacks
  raises ``ValueError`` naming the field.
- Experts: HF stores one ``nn.Linear`` per expert on disk,
  ``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` (H, D), ``w2`` (D, H), ``w3``
  (H, D) (transformers 5 fuses them to ``gate_up_proj`` in memory only and writes this layout
  back); Lattice stacks them transposed, ``layers.{i}.feed_forward.experts.w1`` (E, D, H),
  ``w2`` (E, H, D), ``w3`` (E, D, H). The router ``block_sparse_moe.gate.weight`` (E, D) is
  ``feed_forward.router.weight`` as is.
- ``HFModel``: an ``HFFolder`` whose ``lattice_tensor`` assembles any Lattice tensor (one
  Lattice expert tensor reads E HF tensors, one at a time).
- Export: ``to_hf_tensors`` (one Lattice tensor -> its HF tensors) and ``hf_config`` (the
  ``config.json`` of the architecture a saved ``model.*`` config maps to).

Checkpoint-side module: no model code is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from checkpoint.hf_llama import LAYER_NAMES, TOP_NAMES, HFFolder, llama_config

ARCHITECTURES = {
    "LlamaForCausalLM": "gpt",
    "MixtralForCausalLM": "gpt_moe",
    "PhimoeForCausalLM": "gpt_moe",
}
"""``config.json`` architecture -> the Lattice model family it imports into."""

BIAS_NAMES = {
    "self_attn.q_proj.bias": "attention.wq.bias",
    "self_attn.k_proj.bias": "attention.wk.bias",
    "self_attn.v_proj.bias": "attention.wv.bias",
    "self_attn.o_proj.bias": "attention.wo.bias",
    "input_layernorm.bias": "attention_norm.bias",
    "post_attention_layernorm.bias": "ffn_norm.bias",
}
TOP_BIAS = {"model.norm.bias": "norm.bias", "lm_head.bias": "output.bias"}
MOE = "block_sparse_moe"
EXPERT_W = ("w1", "w2", "w3")


def _get(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = config.get(key, default)
    return default if value is None else value


def architecture(config: Mapping[str, Any]) -> str:
    """The one supported architecture ``config.json`` names; ``ValueError`` otherwise."""
    names = config.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        shown = ",".join(names) or "no architectures entry"
        raise ValueError(
            f"architecture {shown} (config.json architectures) is not supported: Lattice imports "
            f"{', '.join(ARCHITECTURES)}"
        )
    return names[0]


# -- config.json -> model.* ---------------------------------------------------------------------
def rope_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """``rope_theta`` and the ``rope_*`` scaling fields of ``rope_parameters`` (transformers 5)
    or ``rope_scaling`` + ``rope_theta`` (older files)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {
        "rope_theta": float(params.get("rope_theta", _get(config, "rope_theta", 10000.0)))
    }
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("rope_parameters.partial_rotary_factor != 1 is not supported")
    orig = params.get("original_max_position_embeddings")
    orig = orig or config.get("original_max_position_embeddings")
    if kind == "default":
        return {**out, "rope_scaling": "none"}
    if kind == "llama3":
        return {
            **out,
            "rope_scaling": "llama3",
            "rope_factor": float(_need(params, "factor")),
            "rope_low_freq_factor": float(_need(params, "low_freq_factor")),
            "rope_high_freq_factor": float(_need(params, "high_freq_factor")),
            "rope_original_max_seq_len": int(
                _need({"o": orig}, "o", "original_max_position_embeddings")
            ),
        }
    if kind == "longrope":
        return {
            **out,
            "rope_scaling": "longrope",
            "rope_short_factor": [float(f) for f in _need(params, "short_factor")],
            "rope_long_factor": [float(f) for f in _need(params, "long_factor")],
            "rope_short_mscale": float(_need(params, "short_mscale")),
            "rope_long_mscale": float(_need(params, "long_mscale")),
            "rope_original_max_seq_len": int(
                _need({"o": orig}, "o", "original_max_position_embeddings")
            ),
        }
    raise ValueError(
        f"rope_parameters.rope_type={kind!r} is not supported: use default, llama3 or longrope"
    )


def _need(params: Mapping[str, Any], key: str, shown: str = "") -> Any:
    if params.get(key) is None:
        raise ValueError(f"rope_parameters.{shown or key} is missing")
    return params[key]


def _attention_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The Llama-style fields every supported architecture has."""
    if _get(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config.get('hidden_act')!r}: only 'silu' (SwiGLU)")
    if _get(config, "mlp_bias", False):
        raise ValueError("mlp_bias=True: Lattice's feed-forward has no biases")
    dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    return {
        "vocab_size": int(config["vocab_size"]),
        "dim": dim,
        "n_layers": int(config["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(_get(config, "num_key_value_heads", heads)),
        "head_dim": int(_get(config, "head_dim", dim // heads)),
        "norm_eps": float(_get(config, "rms_norm_eps", 1e-6)),
        "max_seq_len": int(_get(config, "max_position_embeddings", 2048)),
        "tie_embeddings": bool(_get(config, "tie_word_embeddings", False)),
        "attention_bias": bool(_get(config, "attention_bias", False)),
        "sliding_window": int(_get(config, "sliding_window", 0)),
        **rope_kwargs(config),
    }


def _moe_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "n_experts": int(config["num_local_experts"]),
        "top_k": int(config["num_experts_per_tok"]),
        "moe_ffn_hidden": int(config["intermediate_size"]),
        "aux_loss_coef": float(_get(config, "router_aux_loss_coef", 0.0)),
        "balance_convention": "hf",
    }


def model_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model.*`` fields (``GPTArgs`` / ``MoEArgs`` names) of a ``config.json``."""
    arch = architecture(config)
    kw = _attention_kwargs(config)
    if arch == "LlamaForCausalLM":
        return {**kw, "ffn_hidden": int(config["intermediate_size"])}
    kw.update(_moe_kwargs(config))
    if arch == "MixtralForCausalLM":
        return {
            **kw,
            "router": "softmax",
            "input_jitter": float(_get(config, "router_jitter_noise", 0.0)),
        }
    return {  # PhimoeForCausalLM (GRIN-MoE)
        **kw,
        "router": "sparsemixer",
        "norm": "layernorm",
        "lm_head_bias": bool(_get(config, "lm_head_bias", False)),
        "jitter_eps": float(_get(config, "router_jitter_noise", 0.01)),
        "input_jitter": float(_get(config, "input_jitter_noise", 0.0)),
        "heun_third": 0.3333,
    }


# -- tensor names and layouts -------------------------------------------------------------------
def _rope_rows(name: str) -> bool:
    return name.endswith(
        ("attention.wq.weight", "attention.wk.weight", "attention.wq.bias", "attention.wk.bias")
    )


def _rope_heads(t: torch.Tensor, head_dim: int) -> int:
    return t.shape[0] // head_dim


def _permute(t: torch.Tensor, head_dim: int, to_hf: bool) -> torch.Tensor:
    """q/k rows (weights (H*D, E) or biases (H*D,)) between HF's half split and Lattice's
    interleaved pairs (``hf_llama.unpermute_rope`` / ``permute_rope`` for 1-D too)."""
    w = t if t.ndim == 2 else t[:, None]
    heads, half = w.shape[0] // head_dim, head_dim // 2
    if to_hf:
        out = w.view(heads, half, 2, w.shape[1]).transpose(1, 2)
    else:
        out = w.view(heads, 2, half, w.shape[1]).transpose(1, 2)
    out = out.reshape(w.shape)
    return out if t.ndim == 2 else out[:, 0]


def expert_keys(lattice_name: str, n_experts: int) -> list[str] | None:
    """HF keys of one stacked Lattice expert tensor (``layers.{i}.feed_forward.experts.w1``),
    expert 0 first; None for any other name."""
    parts = lattice_name.split(".")
    if len(parts) != 5 or parts[2:4] != ["feed_forward", "experts"] or parts[4] not in EXPERT_W:
        return None
    return [
        f"model.layers.{parts[1]}.{MOE}.experts.{e}.{parts[4]}.weight" for e in range(n_experts)
    ]


def hf_key(lattice_name: str) -> str:
    """The HF key of a non-expert Lattice tensor."""
    top = {**{v: k for k, v in TOP_NAMES.items()}, **{v: k for k, v in TOP_BIAS.items()}}
    if lattice_name in top:
        return top[lattice_name]
    parts = lattice_name.split(".")
    tail = ".".join(parts[2:])
    layer = {v: k for k, v in {**LAYER_NAMES, **BIAS_NAMES}.items()}
    if parts[0] == "layers" and tail in layer:
        return f"model.layers.{parts[1]}.{layer[tail]}"
    if parts[0] == "layers" and tail == "feed_forward.router.weight":
        return f"model.layers.{parts[1]}.{MOE}.gate.weight"
    raise ValueError(f"no Hugging Face name for Lattice tensor {lattice_name!r}")


def to_hf_tensors(
    lattice_name: str, t: torch.Tensor, head_dim: int, n_experts: int = 0
) -> list[tuple[str, torch.Tensor]]:
    """One Lattice tensor -> its (HF key, tensor) pairs: E per-expert matrices for a stacked
    expert tensor (transposed), q/k rows in HF's RoPE order, anything else renamed."""
    keys = expert_keys(lattice_name, n_experts)
    if keys is not None:
        return [(k, t[e].t().contiguous()) for e, k in enumerate(keys)]
    if _rope_rows(lattice_name):
        t = _permute(t, head_dim, to_hf=True)
    return [(hf_key(lattice_name), t)]


class HFModel(HFFolder):
    """An ``HFFolder`` of any supported architecture: ``kwargs`` are the ``model.*`` fields of
    its ``config.json`` and ``lattice_tensor`` assembles a Lattice tensor from its HF tensors."""

    @functools.cached_property
    def kwargs(self) -> dict[str, Any]:
        return model_kwargs(self.config)

    @property
    def family(self) -> str:
        return ARCHITECTURES[architecture(self.config)]

    def hf_keys(self, lattice_name: str) -> list[str]:
        """The HF tensors ``lattice_name`` is made of."""
        keys = expert_keys(lattice_name, int(self.kwargs.get("n_experts", 0)))
        return keys if keys is not None else [hf_key(lattice_name)]

    def key(self, lattice_name: str) -> str:
        """The HF key of a non-expert tensor (``embed_tokens`` for a tied ``lm_head``)."""
        key = hf_key(lattice_name)
        if key == "lm_head.weight" and key not in self.files and self.kwargs["tie_embeddings"]:
            key = "model.embed_tokens.weight"
        return self.present(key, lattice_name)

    def shape(self, lattice_name: str) -> tuple[int, ...]:
        """The stored shape, from the file headers: (E, in, out) for a stacked expert tensor."""
        from checkpoint.safetensors_slices import tensor_shape

        keys = expert_keys(lattice_name, int(self.kwargs.get("n_experts", 0)))
        if keys is None:
            return super().shape(lattice_name)
        first = self.present(keys[0], lattice_name)
        out_, in_ = tensor_shape(self.path / self.files[first], first)
        return (len(keys), in_, out_)

    def read_local(self, lattice_name: str, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``HFFolder.read_local``, and for a stacked expert tensor (E, in, out): only this
        rank's experts (``index[0]``), each read as its (out, in) box and transposed."""
        from checkpoint.safetensors_slices import read_box

        keys = expert_keys(lattice_name, int(self.kwargs.get("n_experts", 0)))
        if keys is None:
            return super().read_local(lattice_name, index)
        parts = []
        for e in index[0].tolist():
            key = self.present(keys[e], lattice_name)
            part = read_box(self.path / self.files[key], key, (index[2], index[1]))
            self.bytes_read += part.numel() * part.element_size()
            parts.append(part.t())
        return torch.stack(parts)

    def _hf_rows(self, lattice_name: str, rows: torch.Tensor) -> torch.Tensor:
        """HF rows of Lattice q/k rows (weights and biases; ``head_dim`` may be explicit)."""
        if not _rope_rows(lattice_name):
            return rows
        head_dim = int(self.kwargs["head_dim"])
        head, within = rows // head_dim, rows % head_dim
        return head * head_dim + (within % 2) * (head_dim // 2) + within // 2

    def lattice_tensor(self, lattice_name: str) -> torch.Tensor:
        """The Lattice tensor ``lattice_name`` (full, unsharded), read one HF tensor at a time."""
        kw = self.kwargs
        keys = expert_keys(lattice_name, int(kw.get("n_experts", 0)))
        if keys is not None:
            return torch.stack([self.get(k).t() for k in keys])
        key = hf_key(lattice_name)
        if key == "lm_head.weight" and key not in self.files and kw["tie_embeddings"]:
            key = "model.embed_tokens.weight"
        t = self.get(key)
        return _permute(t, kw["head_dim"], to_hf=False) if _rope_rows(lattice_name) else t


# -- export: model.* -> config.json -------------------------------------------------------------
def export_architecture(model: Mapping[str, Any]) -> str:
    """The HF architecture a saved ``model.*`` config exports as; ``ValueError`` naming the
    field that has no HF counterpart."""
    if model.get("name") == "gpt":
        if model.get("norm", "rmsnorm") != "rmsnorm" or model.get("lm_head_bias"):
            raise ValueError(
                "LlamaForCausalLM has RMSNorm and no lm_head bias: model.norm / model.lm_head_bias"
            )
        return "LlamaForCausalLM"
    if model.get("name") != "gpt_moe":
        raise ValueError(f"model.name={model.get('name')!r} has no Hugging Face architecture")
    if model.get("router") == "softmax":
        if (
            model.get("norm", "rmsnorm") != "rmsnorm"
            or model.get("lm_head_bias")
            or model.get("attention_bias")
        ):
            raise ValueError(
                "model.router=softmax exports as MixtralForCausalLM, which has RMSNorm and no "
                "biases: set model.norm=rmsnorm, model.attention_bias=false, model.lm_head_bias=false"
            )
        return "MixtralForCausalLM"
    if model.get("norm") != "layernorm":
        raise ValueError(
            "model.router=sparsemixer exports as PhimoeForCausalLM, whose norms are LayerNorm: "
            f"model.norm={model.get('norm', 'rmsnorm')!r} has no Hugging Face counterpart"
        )
    return "PhimoeForCausalLM"


def _rope_parameters(model: Mapping[str, Any]) -> dict[str, Any]:
    theta = float(model.get("rope_theta", 10000.0))
    kind = model.get("rope_scaling", "none")
    orig = int(model.get("rope_original_max_seq_len", 8192))
    if kind == "llama3":
        return {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": float(model["rope_factor"]),
            "low_freq_factor": float(model["rope_low_freq_factor"]),
            "high_freq_factor": float(model["rope_high_freq_factor"]),
            "original_max_position_embeddings": orig,
        }
    if kind == "longrope":
        return {
            "rope_type": "longrope",
            "rope_theta": theta,
            "short_factor": list(model["rope_short_factor"]),
            "long_factor": list(model["rope_long_factor"]),
            "short_mscale": float(model["rope_short_mscale"]),
            "long_mscale": float(model["rope_long_mscale"]),
            "original_max_position_embeddings": orig,
        }
    return {"rope_type": "default", "rope_theta": theta}


def hf_config(model: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """``config.json`` for a saved ``model.*`` config; derived sizes (kv heads, hidden sizes,
    expert count) are read off the exported tensors' ``shapes``."""
    arch = export_architecture(model)
    heads = int(model["n_heads"])
    head_dim = int(model.get("head_dim") or int(model["dim"]) // heads)
    kv = shapes["layers.0.attention.wk.weight"][0] // head_dim
    if arch == "LlamaForCausalLM":
        ffn = shapes["layers.0.feed_forward.w1.weight"][0]
    else:
        ffn = shapes["layers.0.feed_forward.experts.w1"][2]
    cfg = llama_config(model, ffn_hidden=ffn, n_kv_heads=kv)
    rope = _rope_parameters(model)
    cfg.update(
        architectures=[arch],
        head_dim=head_dim,
        rope_parameters=rope,
        rope_theta=rope["rope_theta"],
        attention_bias=bool(model.get("attention_bias", False)),
    )
    if rope["rope_type"] != "default":
        cfg["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    if arch == "LlamaForCausalLM":
        return cfg
    window = int(model.get("sliding_window", 0))
    cfg.update(
        num_local_experts=shapes["layers.0.feed_forward.experts.w1"][0],
        num_experts_per_tok=int(model.get("top_k", 2)),
        router_aux_loss_coef=float(model.get("aux_loss_coef", 0.0)),
        output_router_logits=float(model.get("aux_loss_coef", 0.0)) > 0,
        sliding_window=window or None,
    )
    for key in ("attention_bias", "mlp_bias"):
        if arch == "MixtralForCausalLM":
            cfg.pop(key, None)
    if arch == "MixtralForCausalLM":
        cfg.update(model_type="mixtral", router_jitter_noise=float(model.get("input_jitter", 0.0)))
        return cfg
    cfg.update(
        model_type="phimoe",
        lm_head_bias=bool(model.get("lm_head_bias", False)),
        router_jitter_noise=float(model.get("jitter_eps", 0.01)),
        input_jitter_noise=float(model.get("input_jitter", 0.0)),
    )
    return cfg
