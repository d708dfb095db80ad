"""``python -m checkpoint.export <ckpt> <out> [--all] [--format lattice|hf]``.

``lattice`` (default): the model's logical tensors (canonical names, vocabulary padding removed)
in one safetensors file; ``--all`` also writes optimizer state.

``hf``: a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained(out)`` loads with no
missing or unexpected key: ``config.json``, ``generation_config.json``, safetensors shards of at
most ``--max-shard-mb`` with ``model.safetensors.index.json``, HF names, HF's RoPE row order and
experts as one ``nn.Linear`` each (``checkpoint/hf_arch.py``: gpt -> Llama, gpt_moe -> Mixtral
or PhiMoE). It works from any saved layout (the tensors are consolidated from the universal
checkpoint) and streams: one tensor is assembled at a time (its chunks read with ``pread``,
never memory-mapped), and each output shard is written as soon as its last tensor is in (the
shard plan comes from the index's shapes), so at most one shard is held in memory. A run
started with ``model.from_hf=DIR`` gets DIR's tokenizer files and ``generation_config.json``
copied along, and its bos/eos/pad token ids kept in ``config.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint.consolidate import load_consolidated
from checkpoint.format import CheckpointError, dtype_from_name, read_index, resolve


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


def export_hf(
    ckpt: Path | str, out: Path | str, max_shard_mb: float = 5000, verify: bool = True
) -> int:
    """Write ``ckpt`` as a Hugging Face folder ``out`` (Llama, Mixtral or PhiMoE: the
    architecture follows the saved ``model.*``, ``checkpoint/hf_arch.py``); returns the number
    of tensors. ``verify=False`` skips the sha256 check of the checkpoint's files (a truncated
    file still fails, naming it)."""
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
    weight_map, shard, names, total = {}, {}, [], 0
    shapes: dict[str, tuple[int, ...]] = {}
    tied = bool(model.get("tie_embeddings", False))
    sizes = _exported_bytes(ckpt, tied)
    order = list(sizes)
    flush = _shard_ends(list(sizes.values()), int(max_shard_mb * (1 << 20)))
    j = 0  # position among the exported tensors
    for name, t in iter_consolidated(ckpt, "model/", verify=verify):
        lattice = name.removeprefix("model/")
        shapes[lattice] = tuple(t.shape)
        if lattice == "output.weight" and tied:
            continue  # HF ties lm_head to embed_tokens itself
        assert order[j] == name, (order[j], name)  # the plan's order is the iteration's
        for key, hf_t in to_hf_tensors(lattice, t, head_dim, int(model.get("n_experts", 0))):
            shard[key] = hf_t.contiguous()
            total += hf_t.numel() * hf_t.element_size()
        t = hf_t = None  # the shard holds them; nothing else may once the shard is written
        if j in flush:  # written before the next tensor is assembled: one shard in memory
            names.append(_write_shard(out, shard, len(names) + 1))
            weight_map.update(dict.fromkeys(shard, names[-1]))
            shard = {}
            _return_freed_memory()
        j += 1
    final = _rename_shards(out, names, weight_map)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": final}, indent=2)
    )
    config = hf_config(model, shapes)
    config.update(_token_ids(model.get("from_hf") or ""))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    copied = _copy_beside(model.get("from_hf") or "", out)
    if "generation_config.json" not in copied:
        (out / "generation_config.json").write_text(json.dumps(_generation_config(config)))
    return len(final)


# What save_pretrained / a tokenizer's save_pretrained put beside the weights, copied along.
BESIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _copy_beside(source: str, out: Path) -> list[str]:
    """Copy the tokenizer and generation files of the imported model's folder (the run's
    ``model.from_hf``) into ``out``; the names copied (none when there is no such folder)."""
    src = Path(source) if source else None
    if src is None or not src.is_dir():
        return []
    copied = []
    for name in BESIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def _token_ids(source: str) -> dict:
    """bos/eos/pad token ids of the imported model's ``config.json`` (kept on export)."""
    cfg = Path(source) / "config.json" if source else None
    if cfg is None or not cfg.is_file():
        return {}
    saved = json.loads(cfg.read_text())
    return {k: saved[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in saved}


def _generation_config(config: dict) -> dict:
    """A ``generation_config.json`` for a model with no imported one (transformers' own
    ``GenerationConfig.from_model_config`` keeps the token ids of ``config.json``)."""
    out: dict = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            out[key] = config[key]
    return out


def _return_freed_memory() -> None:
    """Give the freed shard's heap back to the OS (glibc ``malloc_trim``). Tensors under glibc's
    mmap threshold (up to 32 MiB) live on the heap, which glibc keeps after they are freed: without
    this, measured on a 254M-parameter Llama, the process kept ~260 MB of freed shards and peaked
    at a shard plus ~130 MB. A no-op where glibc is absent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _exported_bytes(ckpt: Path, tied: bool) -> dict[str, int]:
    """Bytes of each exported tensor, in ``iter_consolidated``'s order (from the index)."""
    out = {}
    for name, meta in read_index(ckpt)["tensors"].items():
        if not name.startswith("model/") or (tied and name == "model/output.weight"):
            continue
        numel = 1
        for n in meta["logical_shape"]:
            numel *= int(n)
        out[name] = numel * dtype_from_name(meta["dtype"]).itemsize
    return out


def _shard_ends(sizes: list[int], limit: int) -> set[int]:
    """Positions after which a shard is written: greedy, a shard holds at most ``limit`` bytes
    unless one tensor alone is larger."""
    ends, acc = set(), 0
    for i, n in enumerate(sizes):
        if acc and acc + n > limit:
            ends.add(i - 1)
            acc = 0
        acc += n
    if sizes:
        ends.add(len(sizes) - 1)
    return ends


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
    ap.add_argument(
        "--no-verify", action="store_true", help="hf: skip the sha256 check of the checkpoint"
    )
    a = ap.parse_args(argv)
    try:
        if a.format == "hf":
            n = export_hf(a.ckpt, a.out, a.max_shard_mb, verify=not a.no_verify)
        else:
            n = export(a.ckpt, a.out, a.all)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
