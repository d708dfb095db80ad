"""``python -m train.generate CKPT_OR_HF_DIR --prompt "..."``: sample text from a Lattice
checkpoint or a Hugging Face Llama folder.

    python -m train.generate runs/default/checkpoints --prompt "def " --max-new-tokens 64
    python -m train.generate runs/x/checkpoints/step_00000100 --prompt "import" \\
        --temperature 0.8 --top-p 0.95 --seed 1
    python -m train.generate path/to/llama --prompt "Once upon" --temperature 0

Loads a checkpoint saved on any layout (``checkpoint.consolidate.load_consolidated`` assembles
the logical tensors; the run's config rides in ``train_state.json``) or a ``save_pretrained``
``LlamaForCausalLM`` folder (``config.json`` + safetensors, read one tensor at a time through
``checkpoint.hf_llama.HFFolder``, the importer ``model.from_hf`` uses; its ``tokenizer.json``
decodes), builds the plain single-process model of the family (``gpt`` or ``gpt_moe``), and
decodes with a KV cache:
the prompt is run once (prefill), then one token per step reuses the cached keys/values
(``models.gpt.KVCache``). Greedy at ``--temperature 0``, else temperature + nucleus (top-p)
sampling from a seeded ``torch.Generator``; tokens stream to stdout as they are produced.

Hand-written rather than transformers' ``generate``: that needs a ``PreTrainedModel`` and its
cache classes, and cannot drive Lattice's ``GPT``. The loop is ~30 lines; the test checks it
token for token against the uncached full forward and against transformers' greedy decoding on a
converted Llama (``checkpoint/hf_llama.py``).

Decoding uses the data's tokenizer: the data folder's ``meta.json`` ``tokenizer`` entry
(``"bytes"``, or ``{kind, name, sha256}`` naming a ``tokenizer.json``, sentencepiece model or
tiktoken file), else bytes (vocabulary 256, invalid UTF-8 shown as U+FFFD); for a Hugging Face
folder, its ``tokenizer.json`` (``--data`` overrides both).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from checkpoint.consolidate import load_consolidated
from checkpoint.format import INDEX, CheckpointError, has_checkpoints, read_index, resolve
from models.errors import LatticeUserError
from models.gpt import GPT, GPTConfig, KVCache
from models.moe import GPTMoE, MoEConfig

MODELS: dict[str, tuple[type[GPTConfig], type[GPT]]] = {
    "gpt": (GPTConfig, GPT),
    "gpt_moe": (MoEConfig, GPTMoE),
}


class GenerateError(LatticeUserError):
    """A bad argument or an unusable checkpoint; the message names which."""


# -- loading ------------------------------------------------------------------------------------
def resolve_checkpoint(path: Path | str) -> Path:
    """A step folder from a step folder, a checkpoints folder (its latest) or a run folder."""
    p = Path(path)
    if not p.exists():
        raise GenerateError(f"CKPT {str(p)!r}: no such checkpoint folder")
    if (p / INDEX).exists() or p.name.startswith("step_"):
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir() and has_checkpoints(root):
            return resolve(root, "latest")
    raise GenerateError(
        f"CKPT {str(p)!r} holds no checkpoint: give a step_* folder, a checkpoints folder or a "
        "run folder"
    )


def saved_config(ckpt: Path) -> dict:
    """The run's resolved config: ``train_state.json``'s ``config``, else the run's config.yaml."""
    index = read_index(ckpt)
    state = json.loads((ckpt / index["train_state"]).read_text())
    if state.get("config"):
        return state["config"]
    run_yaml = ckpt.parent.parent / "config.yaml"
    if run_yaml.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(run_yaml), resolve=True)
    raise GenerateError(f"CKPT {str(ckpt)!r}: no saved config (train_state.json or config.yaml)")


def build_model(model_cfg: dict) -> GPT:
    """The plain single-process model for a saved ``model`` config section."""
    name = model_cfg.get("name", "gpt")
    if name not in MODELS:
        raise GenerateError(f"model.name={name!r} is not a language model: use {sorted(MODELS)}")
    config_cls, model_cls = MODELS[name]
    fields = config_cls.__dataclass_fields__
    return model_cls(config_cls(**{k: v for k, v in model_cfg.items() if k in fields}))


def load_weights(model: GPT, tensors: dict[str, torch.Tensor]) -> None:
    """Load ``{"model/<fqn>": tensor}`` (vocabulary padding already dropped) into ``model``."""
    sd = {k.removeprefix("model/"): v.float() for k, v in tensors.items()}
    if model.cfg.tie_embeddings:
        sd.setdefault("output.weight", sd.get("tok_embeddings.weight"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise GenerateError(
            f"checkpoint tensors do not fit model.*: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )


def is_hf_folder(path: Path | str) -> bool:
    """A ``save_pretrained`` folder (``config.json``), not a Lattice checkpoint or run."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / INDEX).exists()


def load_hf_model(folder: Path | str) -> GPT:
    """The model of a Hugging Face Llama, Mixtral or PhiMoE folder (``checkpoint.hf_arch``),
    in eval mode, filled one tensor at a time."""
    from checkpoint.hf_arch import HFModel

    try:
        hf = HFModel(folder)
        config_cls, model_cls = MODELS[hf.family]
        fields = config_cls.__dataclass_fields__
        with torch.device("meta"):
            model = model_cls(config_cls(**{k: v for k, v in hf.kwargs.items() if k in fields}))
        model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():  # a tied output is tok_embeddings
                p.copy_(hf.lattice_tensor(name).to(torch.float32))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise GenerateError(f"CKPT {str(folder)!r} (a Hugging Face folder): {exc}") from None
    return model.eval()


def load_model(ckpt: Path | str) -> tuple[GPT, dict]:
    """(model in eval mode with the weights, the run's config) for a checkpoint, or for a
    Hugging Face Llama folder (config: ``{"hf": folder}``)."""
    if is_hf_folder(ckpt):
        return load_hf_model(ckpt), {"hf": str(ckpt)}
    step = resolve_checkpoint(ckpt)
    cfg = saved_config(step)
    model = build_model(cfg.get("model") or {})
    load_weights(model, load_consolidated(step, "model/"))
    return model.eval(), cfg


# -- tokenizer ----------------------------------------------------------------------------------
@dataclass
class Tokenizer:
    """``encode``/``decode`` of the run's data; bytes when the data names no tokenizer."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    kind: str = "bytes"


BYTES = Tokenizer(
    encode=lambda s: list(s.encode("utf-8")),
    decode=lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", errors="replace"),
)


def data_dir(cfg: dict) -> Path:
    """The run's token folder (``data.path``; the stdlib corpus' default cache folder)."""
    data = cfg.get("data") or {}
    return Path(data.get("path") or "data_cache/stdlib")


def _tokenizer_file(folder: Path, name: str) -> Path:
    for p in (Path(name), folder / name, folder / Path(name).name):
        if p.is_file():
            return p
    raise GenerateError(f"{folder}/meta.json names tokenizer {name!r}, which is not found")


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer ``folder/meta.json`` names (HF ``tokenizer.json`` or sentencepiece); bytes
    when there is no meta.json or it says ``bytes``."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return BYTES
    entry = json.loads(meta_path.read_text()).get("tokenizer", "bytes")
    if not isinstance(entry, dict) or entry.get("kind", "bytes") == "bytes":
        return BYTES
    kind, path = entry["kind"], _tokenizer_file(folder, str(entry.get("name", "")))
    if kind in ("sentencepiece", "spm"):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return Tokenizer(lambda s: sp.encode(s), lambda ids: sp.decode(ids), kind)
    return hf_tokenizer(path, kind)


def hf_tokenizer(path: Path, kind: str = "hf") -> Tokenizer:
    """A ``tokenizer.json`` (or, ``kind="tiktoken"``, a tiktoken BPE file) via ``tokenizers``."""
    if kind == "tiktoken":
        from train.tiktoken_bpe import load_tiktoken

        tok = load_tiktoken(path)
    else:
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_file(str(path))
    return Tokenizer(
        lambda s: tok.encode(s, add_special_tokens=False).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=False),
        kind,
    )


# -- decoding -----------------------------------------------------------------------------------
def sample_next(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """(B,) next tokens: argmax at ``temperature == 0``, else a draw from the smallest set of
    tokens whose probability reaches ``top_p`` (nucleus sampling), renormalised."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass of the more likely tokens
    sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)
    pick_B1 = torch.multinomial(sorted_BV, 1, generator=generator)
    return order_BV.gather(-1, pick_B1).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_BS: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend ``prompt_BS`` by ``max_new_tokens`` tokens.

    Args:
        model: a ``GPT``/``GPTMoE`` in eval mode.
        prompt_BS: (B, S) int64 prompt ids (S >= 1).
        max_new_tokens: tokens to add.
        temperature, top_p: sampling (``temperature == 0`` is greedy).
        generator: the seeded source of the draws (default: seed 0).
        on_token: called with each step's (B,) tokens (streaming).
        use_cache: decode with a ``KVCache`` (prefill once, then one position per step);
            False re-runs the full sequence every step (the reference the cache must equal).

    Returns:
        (B, S + max_new_tokens) prompt and generated ids.
    """
    vocab = model.cfg.vocab_size  # logits beyond it are vocabulary padding
    generator = generator or torch.Generator(prompt_BS.device).manual_seed(0)
    B, S = prompt_BS.shape
    cache = KVCache.for_model(model, B, S + max_new_tokens) if use_cache else None
    seq_BS, step_in = prompt_BS, prompt_BS
    for _ in range(max_new_tokens):
        logits = model(step_in, cache=cache) if use_cache else model(seq_BS)
        nxt_B = sample_next(logits[:, -1, :vocab], temperature, top_p, generator)
        seq_BS = torch.cat([seq_BS, nxt_B[:, None]], dim=1)
        step_in = nxt_B[:, None]
        if on_token is not None:
            on_token(nxt_B)
    return seq_BS


class Streamer:
    """Prints the text of each new token as soon as it is complete (a multi-byte character or
    merge waits for the tokens that finish it: text ending in U+FFFD is held back)."""

    def __init__(self, tok: Tokenizer, prompt_ids: list[int], out: Any = None) -> None:
        self.tok, self.ids, self.out = tok, list(prompt_ids), out or sys.stdout
        self.shown = len(tok.decode(self.ids))

    def __call__(self, nxt_B: torch.Tensor) -> None:
        self.ids.append(int(nxt_B[0]))
        self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        text = self.tok.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown :])
        self.out.flush()
        self.shown = len(text)


# -- command line -------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like the other CLIs
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = _Parser(prog="python -m train.generate", description=__doc__.splitlines()[0])
    ap.add_argument(
        "ckpt",
        help="a checkpoint (step_* folder, checkpoints folder or run dir) or a Hugging Face "
        "Llama folder",
    )
    ap.add_argument("--prompt", required=True, help="text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in (0, 1]")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    ap.add_argument("--data", default=None, help="data folder with meta.json (the tokenizer)")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    a = ap.parse_args(argv)
    if a.max_new_tokens < 1:
        ap.error(f"argument --max-new-tokens: {a.max_new_tokens} must be >= 1")
    if not a.temperature >= 0:
        ap.error(f"argument --temperature: {a.temperature} must be >= 0 (0 = greedy)")
    if not 0 < a.top_p <= 1:
        ap.error(f"argument --top-p: {a.top_p} must be in (0, 1]")
    if not a.prompt:
        ap.error("argument --prompt: must not be empty")
    return a


def encode_prompt(tok: Tokenizer, prompt: str, model: GPT, max_new_tokens: int) -> list[int]:
    """The prompt's ids, checked against the vocabulary and the model's ``max_seq_len``."""
    ids = tok.encode(prompt)
    cfg = model.cfg
    if not ids or max(ids) >= cfg.vocab_size:
        raise GenerateError(f"argument --prompt: its tokens do not fit vocab_size={cfg.vocab_size}")
    if len(ids) + max_new_tokens > cfg.max_seq_len:
        raise GenerateError(
            f"argument --max-new-tokens: {len(ids)} prompt + {max_new_tokens} new tokens exceed "
            f"model.max_seq_len={cfg.max_seq_len}"
        )
    return ids


def run_tokenizer(cfg: dict, data: str | None) -> Tokenizer:
    """``--data``'s tokenizer, else a Hugging Face folder's ``tokenizer.json``, else the run's
    data folder's."""
    if data:
        return load_tokenizer(Path(data))
    if "hf" in cfg:
        path = Path(cfg["hf"]) / "tokenizer.json"
        if not path.is_file():
            raise GenerateError(
                f"CKPT {cfg['hf']!r} has no tokenizer.json: copy it there or pass --data DIR "
                "(a folder whose meta.json names the tokenizer)"
            )
        return hf_tokenizer(path)
    return load_tokenizer(data_dir(cfg))


def run(a: argparse.Namespace) -> None:
    """Load, encode, stream the generated text to stdout."""
    model, cfg = load_model(a.ckpt)
    model = model.to(a.device)
    tok = run_tokenizer(cfg, a.data)
    ids = encode_prompt(tok, a.prompt, model, a.max_new_tokens)
    stream = Streamer(tok, ids)
    sys.stdout.write(a.prompt)
    gen = torch.Generator(a.device).manual_seed(a.seed)
    prompt_BS = torch.tensor([ids], dtype=torch.long, device=a.device)
    generate(model, prompt_BS, a.max_new_tokens, a.temperature, a.top_p, gen, stream)
    stream.flush()
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        run(a)
    except (LatticeUserError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
