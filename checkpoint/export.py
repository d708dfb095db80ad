"""``python -m checkpoint.export <ckpt> <out> [--all] [--format lattice|hf]``.

``lattice`` (default): the model's logical tensors (canonical names, vocabulary padding removed)
in one safetensors file; ``--all`` also writes optimizer state.

``hf``: a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained(out)`` loads with no
missing or unexpected key: ``config.json``, ``generation_config.json``, safetensors shards of at
most ``--max-shard-mb`` with ``model.safetensors.index.json``, HF names, HF's RoPE row order and
experts as one ``nn.Linear`` each (``checkpoint/hf_arch.py``: gpt -> Llama, gpt_moe -> Mixtral
or PhiMoE). It works from any saved layout (the tensors are consolidated from the universal
checkpoint) and streams: one tensor is assembled at a time, and at most one output shard is
held in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint.consolidate import load_consolidated
from checkpoint.format import CheckpointError, read_index, resolve


def export(ckpt: Path | str, out: Path | str, include_optimizer: bool = False) -> int:
    """Write the consolidated tensors of ``ckpt`` to ``out``; returns the number of tensors."""
    ckpt = _resolve(Path(ckpt))
    tensors = load_consolidated(ckpt, None if include_optimizer else "model/")
    named = {
        (k.removeprefix("model/") if not include_optimizer else k): v.contiguous()
        for k, v in tensors.items()
    }
    save_file(named, str(out), metadata={"source": str(ckpt)})
    return len(named)


def _saved_model_config(ckpt: Path) -> dict:
    index = read_index(ckpt)
    state = json.loads((ckpt / index["train_state"]).read_text())
    model = (state.get("config") or {}).get("model")
    if not model:
        raise CheckpointError(f"{ckpt} records no model config: it cannot be exported as hf")
    return model


def _write_shard(out: Path, tensors: dict[str, torch.Tensor], n: int) -> str:
    name = f"model-{n:05d}.safetensors"
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    return name


def export_hf(ckpt: Path | str, out: Path | str, max_shard_mb: float = 5000) -> int:
    """Write ``ckpt`` as a Hugging Face folder ``out`` (Llama, Mixtral or PhiMoE: the
    architecture follows the saved ``model.*``, ``checkpoint/hf_arch.py``); returns the number
    of tensors."""
    from checkpoint.consolidate import iter_consolidated
    from checkpoint.hf_arch import export_architecture, hf_config, to_hf_tensors

    ckpt, out = _resolve(Path(ckpt)), Path(out)
    model = _saved_model_config(ckpt)
    try:
        export_architecture(model)
    except ValueError as exc:
        raise CheckpointError(f"--format hf: {exc}") from None
    head_dim = int(model.get("head_dim") or int(model["dim"]) // int(model["n_heads"]))
    out.mkdir(parents=True, exist_ok=True)
    weight_map, shard, shard_bytes, names, total = {}, {}, 0, [], 0
    shapes: dict[str, tuple[int, ...]] = {}
    limit = int(max_shard_mb * (1 << 20))
    tied = bool(model.get("tie_embeddings", False))
    for name, t in iter_consolidated(ckpt, "model/"):
        lattice = name.removeprefix("model/")
        shapes[lattice] = tuple(t.shape)
        if lattice == "output.weight" and tied:
            continue  # HF ties lm_head to embed_tokens itself
        for key, hf_t in to_hf_tensors(lattice, t, head_dim, int(model.get("n_experts", 0))):
            nbytes = hf_t.numel() * hf_t.element_size()
            if shard and shard_bytes + nbytes > limit:
                names.append(_write_shard(out, shard, len(names) + 1))
                weight_map.update(dict.fromkeys(shard, names[-1]))
                shard, shard_bytes = {}, 0
            shard[key] = hf_t.contiguous()
            shard_bytes += nbytes
            total += nbytes
    if shard:
        names.append(_write_shard(out, shard, len(names) + 1))
        weight_map.update(dict.fromkeys(shard, names[-1]))
    final = _rename_shards(out, names, weight_map)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": final}, indent=2)
    )
    config = hf_config(model, shapes)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True}))
    return len(final)


def _rename_shards(out: Path, names: list[str], weight_map: dict[str, str]) -> dict[str, str]:
    """``model-00001.safetensors`` -> HF's ``model-00001-of-0000N.safetensors``."""
    n = len(names)
    renamed = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(names)}
    for old, new in renamed.items():
        os.replace(out / old, out / new)
    return {k: renamed[v] for k, v in weight_map.items()}


def _resolve(ckpt: Path) -> Path:
    if ckpt.name == "checkpoints" or (ckpt / "latest").exists():
        return resolve(ckpt, "latest")
    return ckpt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m checkpoint.export", description=__doc__)
    ap.add_argument("ckpt", help="checkpoint folder (step_*) or a checkpoints/ folder (latest)")
    ap.add_argument("out", help="output .safetensors path (lattice) or folder (hf)")
    ap.add_argument("--all", action="store_true", help="include optimizer state (lattice)")
    ap.add_argument("--format", choices=("lattice", "hf"), default="lattice")
    ap.add_argument("--max-shard-mb", type=float, default=5000, help="hf: MiB per shard")
    a = ap.parse_args(argv)
    try:
        if a.format == "hf":
            n = export_hf(a.ckpt, a.out, a.max_shard_mb)
        else:
            n = export(a.ckpt, a.out, a.all)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
