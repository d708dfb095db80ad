"""The ``gpt`` family: a Llama-style decoder on token data (``models/gpt.py``).

Owns the family's typed ``model.*`` args, the checks that need the model and the layout
together, the token loaders, one step's forward/backward (plain, or through the pipeline
schedule that ``parallelism.pipeline.build_schedule`` builds), the next-token loss and
validation. ``gpt_moe`` (``train/families/gpt_moe.py``) extends it.

Loss scaling: each micro-batch contributes ``mean_token_loss / n_micro``; data-parallel
gradient reduction averages over ranks; so the update equals the single-process update on the
same global batch (all micro-batches have the same token count), whatever the layout.
Sequence parallelism (Ulysses): every rank feeds its contiguous slice of each sequence at its
global positions; ``self.seq_slice`` is that slice, computed once here for every path.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from checkpoint.adapter import CheckpointAdapter
from models.errors import ConfigError, LayoutError
from models.gpt import GPT, GPTConfig, document_ids, document_mask, document_positions
from parallelism.init import (
    canonical_name,
    copy_local_into_,
    local_index,
    materialize_and_init_,
)
from parallelism.parallelize_gpt import finalize_data_parallel, parallelize_gpt
from parallelism.pipeline import PipelineSchedule, build_schedule, validate_pipeline
from parallelism.tensor_parallel import tp_loss_context, validate_tensor_parallel
from parallelism.ulysses import sequence_slice, validate_ulysses
from parallelism.utils import all_reduce_mean
from train.config import ModelArgs
from train.data import BYTE_VOCAB, TokenShards, micro_batch_offset, read_meta, resolve_data_dir
from train.families.base import Family
from train.flops import FlopCount, gpt_step_flops
from train.loaders import build_token_loader

TOKEN_DATA = ("stdlib", "shards")


@dataclass
class GPTArgs(ModelArgs):
    """A Llama-style decoder (``model=gpt_tiny``, ``model=gpt_small``)."""

    name: str = "gpt"
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the data's ``meta.json`` (256 for the byte-level
    corpus). A value below the data's is refused; a larger one is padding (e.g. 50304 for
    GPT-2's 50257) whose rows no token reaches."""
    dim: int = 128
    """Hidden size."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 means n_heads (multi-head attention)."""
    ffn_hidden: int = 0
    """SwiGLU hidden size; 0 means 8/3 x dim rounded up to ``multiple_of``."""
    multiple_of: int = 32
    """Rounding of the derived SwiGLU hidden size."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    max_seq_len: int = 2048
    """Longest sequence the rotary table covers."""
    tie_embeddings: bool = False
    """Share the token embedding and the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    head_dim: int = 0
    """Per-head size; 0 means dim // n_heads (HF ``head_dim``)."""
    norm: str = "rmsnorm"
    """``rmsnorm``, or ``layernorm`` with a bias (PhiMoE's norms)."""
    attention_bias: bool = False
    """Biases on the q/k/v/o projections (HF ``attention_bias``)."""
    lm_head_bias: bool = False
    """A bias on the output projection (HF ``lm_head_bias``)."""
    sliding_window: int = 0
    """Each query attends to the last ``sliding_window`` positions only, itself included
    (HF ``sliding_window``); 0 = full causal attention."""
    rope_scaling: str = "none"
    """``none``, ``llama3`` (Llama 3.x, HF ``rope_type: llama3``) or ``longrope`` (PhiMoE)."""
    rope_factor: float = 8.0
    """llama3: divisor of the low frequencies (HF ``factor``)."""
    rope_low_freq_factor: float = 1.0
    """llama3: HF ``low_freq_factor``."""
    rope_high_freq_factor: float = 4.0
    """llama3: HF ``high_freq_factor``."""
    rope_original_max_seq_len: int = 8192
    """llama3 / longrope: HF ``original_max_position_embeddings``."""
    rope_short_factor: list[float] = field(default_factory=list)
    """longrope: head_dim // 2 frequency divisors up to the original length (HF
    ``short_factor``)."""
    rope_long_factor: list[float] = field(default_factory=list)
    """longrope: the divisors beyond the original length (HF ``long_factor``)."""
    rope_short_mscale: float = 1.0
    """longrope: cos/sin scale up to the original length (HF ``short_mscale``)."""
    rope_long_mscale: float = 1.0
    """longrope: cos/sin scale beyond it (HF ``long_mscale``)."""
    from_hf: str = ""
    """A Hugging Face ``save_pretrained`` folder (``LlamaForCausalLM`` for model=gpt,
    ``MixtralForCausalLM`` or ``PhimoeForCausalLM`` for model=gpt_moe): the ``model.*`` fields
    come from its ``config.json`` (an override that contradicts it fails, naming both) and the
    weights from its safetensors, loaded onto any layout one tensor at a time."""


def tokens_per_byte(meta: dict, split: str) -> float | None:
    """Tokens per UTF-8 byte of the source text of ``split`` (1 for byte-level shards), from
    ``meta.json``; None when the shards do not record their text bytes."""
    tokens, text = meta.get(f"{split}_tokens"), (meta.get("text_bytes") or {}).get(split)
    if tokens and text:
        return tokens / text
    return 1.0 if tokenizer_of(meta)[0] == "bytes" else None


def tokenizer_of(meta: dict) -> tuple[str, str]:
    """(kind, name) of the tokenizer ``meta.json`` records: a ``{kind, name, ...}`` record, or
    the older plain string (``"bytes"``)."""
    tok = meta.get("tokenizer") or ("bytes" if meta.get("vocab_size") == BYTE_VOCAB else "?")
    if isinstance(tok, str):
        return tok, tok
    return str(tok.get("kind", "?")), str(tok.get("name", tok.get("kind", "?")))


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; vocabulary padding never enters the softmax."""
    if isinstance(logits_BSV, DTensor):  # vocab-parallel logits (tensor parallelism)
        from parallelism.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits_BSV, targets_BS, vocab_size)
    logits = logits_BSV[..., :vocab_size]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets_BS.flatten())


class GPTFamily(Family):
    """Dense Llama-style GPT on token shards."""

    name: ClassVar[str] = "gpt"
    args: ClassVar[type[ModelArgs]] = GPTArgs
    refuses: ClassVar[dict[str, str]] = {
        "parallel.ep": "expert parallelism needs MoE layers: use model=gpt_moe",
    }
    config_cls: ClassVar[type[GPTConfig]] = GPTConfig
    model_cls: ClassVar[type[nn.Module]] = GPT

    def __init__(self, job: Any, dims: Any, rank: int) -> None:
        super().__init__(job, dims, rank)
        coord = dims.coordinate(rank)
        self.seq_slice = sequence_slice(job.train.seq_len, coord["sp"], dims.sp)
        self.dp_rank = coord["dp_replicate"] * dims.dp_shard + coord["dp_shard"]
        self.pipeline: PipelineSchedule | None = None
        self.eos_id: int | None = None
        self.from_hf_fields: tuple[str, ...] = ()
        """``model.*`` fields set from ``model.from_hf``'s config.json (saved with the run)."""
        self.hf_bytes_read = 0
        """Tensor bytes this rank read from ``model.from_hf`` (its shards' byte ranges)."""

    # -- before launch ------------------------------------------------------------------------
    def model_config(self) -> GPTConfig:
        """The built model's config: every derived size (kv heads, FFN hidden) comes from it,
        and a ``model.*`` combination that cannot build fails here, naming the field."""
        m = self.job.model
        fields = self.config_cls.__dataclass_fields__
        return self.config_cls(**{k: getattr(m, k) for k in fields if hasattr(m, k)})

    def _data_meta(self) -> dict | None:
        """The data's ``meta.json`` (the byte-level one for ``stdlib``); None while the shards
        are not there (``prepare`` then fails naming ``data.path``)."""
        data = self.job.data
        if data.name == "stdlib":
            return {"vocab_size": BYTE_VOCAB}
        path = Path(data.path)
        return read_meta(path) if (path / "meta.json").is_file() else None

    def _resolve_vocab(self, meta: dict) -> None:
        """``model.vocab_size`` from the data's ``meta.json`` (0), or checked against it."""
        m, data = self.job.model, self.job.data
        have = int(meta["vocab_size"])
        if m.vocab_size == 0:
            m.vocab_size = have
        elif m.vocab_size < have:
            where = f"{Path(data.path) / 'meta.json'}, tokenizer {tokenizer_of(meta)[1]}"
            source = "the byte-level stdlib corpus" if data.name == "stdlib" else where
            raise ConfigError(
                f"model.vocab_size={m.vocab_size} is below the data's vocabulary of {have} "
                f"({source}): token ids up to {have - 1} would index past the embedding; "
                f"remove the override (model.vocab_size=0 takes it from meta.json) or set >= {have}"
            )
        self._check_hf_tokenizer(meta)

    def _check_hf_tokenizer(self, meta: dict) -> None:
        """Shards for an imported model must come from the folder's own ``tokenizer.json``
        (compared by the sha256 meta.json records); a folder without one is not checked."""
        m = self.job.model
        tok_file = Path(getattr(m, "from_hf", "") or ".") / "tokenizer.json"
        if not getattr(m, "from_hf", "") or not tok_file.is_file():
            return
        from train.tokenizer import file_sha256

        record = meta.get("tokenizer")
        have = record.get("sha256") if isinstance(record, dict) else None
        if have != file_sha256(tok_file):
            kind, name = tokenizer_of(meta)
            meta_path = Path(self.job.data.path or "data_cache/stdlib") / "meta.json"
            raise ConfigError(
                f"{meta_path} records the {kind} tokenizer {name}, not model.from_hf's "
                f"{tok_file} (sha256 differs): prepare the data with `python -m train.prepare "
                f"--tokenizer {tok_file} --out DIR INPUTS` and set data.path=DIR"
            )

    def _hf_folder(self) -> Any:
        from checkpoint.hf_arch import HFModel

        try:
            return HFModel(self.job.model.from_hf)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise ConfigError(f"model.from_hf={self.job.model.from_hf!r}: {exc}") from None

    def _apply_hf_config(self) -> None:
        """``model.*`` from the folder's ``config.json``; a contradicting override fails."""
        m = self.job.model
        if not getattr(m, "from_hf", ""):
            return
        folder = self._hf_folder()
        try:  # the architecture (config.json ``architectures``) picks the mapping
            family, kw = folder.family, folder.kwargs
        except ValueError as exc:
            raise ConfigError(f"model.from_hf={m.from_hf!r}: {exc}") from None
        if family != self.name:
            raise ConfigError(
                f"model.from_hf={m.from_hf!r} is a {folder.architecture} (config.json "
                f"architectures), which imports as model={family}, not model.name={self.name}: "
                f"add model={family}"
            )
        defaults = type(m)()
        explicit = getattr(m, "cli_fields", None)  # load_config records them
        for key, value in kw.items():
            mine = getattr(m, key)
            overridden = key in explicit if explicit is not None else mine != getattr(defaults, key)
            if overridden and mine != value:
                raise ConfigError(
                    f"model.{key}={mine} contradicts {folder.path / 'config.json'} ({value}): "
                    f"remove the override; model.from_hf sets every model.* field it defines"
                )
            setattr(m, key, value)
        self.from_hf_fields = tuple(kw)

    def _load_hf_weights_(self, model: nn.Module) -> None:
        """Every parameter from the HF folder: each rank reads only the byte ranges of its own
        shard (``parallelism.init.local_index``; ``HFModel.read_local``), one tensor at a time,
        so its peak memory is its shard plus about one tensor's slice."""
        folder = self._hf_folder()
        for fqn, p in model.named_parameters():
            name = canonical_name(fqn)
            try:
                stored = folder.shape(name)
            except KeyError as exc:
                raise ConfigError(f"model.from_hf={folder.path}: {exc.args[0]}") from None
            want = tuple(p.shape)
            if name in ("tok_embeddings.weight", "output.weight", "output.bias"):  # padded rows
                want = (min(want[0], int(self.job.model.vocab_size)), *want[1:])
            if stored != want:
                raise ConfigError(
                    f"model.from_hf={folder.path}: tensor {folder.hf_keys(name)[0]} has shape "
                    f"{stored}, but config.json implies {want}: the folder's "
                    "weights and config.json disagree"
                )
            copy_local_into_(p, folder.read_local(name, local_index(p)))
        self.hf_bytes_read = folder.bytes_read

    def _document_eos(self, meta: dict) -> int | None:
        """The EOS id that ends documents when ``data.document_mask`` is on (else None)."""
        job = self.job
        if not job.data.document_mask:
            return None
        meta_path = Path(job.data.path or "data_cache/stdlib") / "meta.json"
        if meta.get("eos_id") is None:
            raise ConfigError(
                f"data.document_mask=true needs document boundaries, but {meta_path} records no "
                "eos_id: write shards with `python -m train.prepare --tokenizer ... --out DIR "
                "INPUTS` (EOS between documents) and set data=shards data.path=DIR"
            )
        return int(meta["eos_id"])

    def resolved_config(self) -> dict[str, Any]:
        m = self.job.model
        return {f"model.{k}": getattr(m, k) for k in ("vocab_size", *self.from_hf_fields)}

    def validate(self) -> None:
        job, dims = self.job, self.dims
        if job.data.name not in TOKEN_DATA:
            raise ConfigError(
                f"data.name={job.data.name!r} cannot feed model.name={self.name}: use data=stdlib "
                "or data=shards"
            )
        self._apply_hf_config()
        meta = self._data_meta()
        if meta is not None:
            self._resolve_vocab(meta)
        cfg = self.model_config()  # dim % n_heads, n_heads % n_kv_heads
        if job.train.seq_len > cfg.max_seq_len:
            raise LayoutError(
                f"train.seq_len={job.train.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}: "
                "lower train.seq_len or raise model.max_seq_len"
            )
        long = job.train.seq_len > cfg.rope_original_max_seq_len
        if cfg.rope_scaling == "longrope" and dims.sp > 1 and long:
            raise LayoutError(
                f"model.rope_scaling=longrope with train.seq_len={job.train.seq_len} > "
                f"model.rope_original_max_seq_len={cfg.rope_original_max_seq_len} and "
                f"parallel.sp={dims.sp}: longrope picks its factors by the sequence length, "
                "which a sequence shard does not see; use parallel.sp=1"
            )
        validate_ulysses(cfg.n_heads, cfg.n_kv_heads, dims.tp, dims.sp, job.train.seq_len)
        validate_tensor_parallel(cfg, dims.tp, job.train.seq_len, job.parallel)
        validate_pipeline(job, dims)

    def prepare(self) -> None:
        self.data_dir = resolve_data_dir(self.job.data)
        meta = self._data_meta()
        assert meta is not None  # resolve_data_dir refused missing shards
        self._resolve_vocab(meta)
        self.eos_id = self._document_eos(meta)

    # -- build ----------------------------------------------------------------------------------
    def build_model(self, device: torch.device, saved: Any = None) -> nn.Module:
        """Meta-device build -> parallelize -> materialise + seeded init -> post-init wrappers."""
        self.device = device
        job = self.job
        with torch.device("meta"):
            model = self.model_cls(self.model_config())
        model = parallelize_gpt(model, self.dims, job)
        from_hf = bool(getattr(job.model, "from_hf", ""))
        materialize_and_init_(model, job.train.seed, device, init=not from_hf)
        if from_hf:  # every parameter is read from the folder (a missing one fails)
            self._load_hf_weights_(model)
        model = finalize_data_parallel(model, self.dims)
        if self.dims.pp > 1:
            vocab = job.model.vocab_size
            self.pipeline = build_schedule(
                model,
                self.dims,
                job,
                lambda out, y: self.loss(out, y, vocab),
                device,
                self.seq_slice.start,
            )
        return model

    def build_loaders(self) -> tuple[Any, Any]:
        t, d, job = self.job.train, self.dims, self.job
        data_dir = self.data_dir
        dp_rank = self.dp_rank

        def make(split: str, shuffle: bool) -> Any:
            shards = TokenShards.open(data_dir, split)
            return build_token_loader(
                job.data,
                shards,
                t.seq_len,
                t.global_batch_size,
                t.micro_batch_size,
                dp_rank,
                d.dp,
                t.seed,
                shuffle,
            )

        return make("train", True), make("val", False)

    def checkpoint_adapter(self, model: nn.Module) -> CheckpointAdapter:
        vocab = self.job.model.vocab_size
        pad = {n: (0, vocab) for n in ("tok_embeddings.weight", "output.weight", "output.bias")}
        return CheckpointAdapter(logical_name=canonical_name, padding=pad)

    # -- one step -------------------------------------------------------------------------------
    def loss(self, out: torch.Tensor, y: torch.Tensor, vocab_size: int) -> torch.Tensor:
        return lm_loss(out, y, vocab_size)

    def token_keys(self, k: int, batch: int) -> torch.Tensor | None:
        """(batch, S_local) int64 keys of micro-batch ``k``'s tokens on this rank: each token's
        global id ``(row in the run) * seq_len + position``, the same on every layout (rows as
        ``train.data.micro_batch_offset`` assigns them). None for a model that takes no keys
        (``GPT.stage_extras``); ``GPTMoE`` keys its router noise with them."""
        if "keys" not in self.model_cls.stage_extras:
            return None
        t, sl = self.job.train, self.seq_slice
        first = self.step * t.global_batch_size
        first += micro_batch_offset(k, self.dp_rank, self.dims.dp, batch)
        rows = torch.arange(first, first + batch, dtype=torch.long)
        pos = torch.arange(sl.start, sl.stop, dtype=torch.long)
        return (rows[:, None] * t.seq_len + pos[None, :]).to(self.device)

    def _forward(self, model: nn.Module, k: int, x: torch.Tensor, pos: Any) -> Any:
        keys = self.token_keys(k, x.shape[0])
        pos, mask = pos if isinstance(pos, tuple) else (pos, None)
        kw = {"positions": pos} if mask is None else {"positions": pos, "attn_mask": mask}
        return model(x, **kw) if keys is None else model(x, keys, **kw)

    def _local(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """This rank's part of a micro-batch (its sequence slice) and those tokens' positions;
        with ``data.document_mask``, (positions (B, S_local), mask (B, 1, S, S)) computed from
        the whole sequence (Ulysses' attention core sees all of it)."""
        sl, dev = self.seq_slice, self.device
        pos: Any = torch.arange(sl.start, sl.stop, device=dev)
        if self.eos_id is not None:
            pos = self._document_inputs(x)
        x = x[:, sl].to(dev, non_blocking=True)
        y = y[:, sl].to(dev, non_blocking=True)
        return x, y, pos

    def _document_inputs(self, x_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions (B, S_local), attention mask (B, 1, S, S)) of the documents in the whole
        (B, S) token rows ``x_BS``, on this rank's device (``data.document_mask``)."""
        doc = document_ids(x_BS, self.eos_id)
        dev = self.device
        return document_positions(doc)[:, self.seq_slice].to(dev), document_mask(doc).to(dev)

    def _context(self) -> ExitStack:
        """Autocast and the vocab-parallel loss context, around forward and backward."""
        stack = ExitStack()
        stack.enter_context(self.autocast())
        stack.enter_context(tp_loss_context(self.dims.tp))  # vocab-parallel loss: fwd and bwd
        return stack

    def forward_backward(self, model: nn.Module, micro_batches: list) -> torch.Tensor:
        if self.pipeline is not None:
            with self._context():
                return self._run_pipeline(micro_batches, train=True)
        total = torch.zeros((), device=self.device)
        n, vocab = len(micro_batches), self.job.model.vocab_size
        for k, (x, y) in enumerate(micro_batches):
            x, y, pos = self._local(x, y)
            with self._context():
                loss = self.loss(self._forward(model, k, x, pos), y, vocab) / n
            loss.backward()
            total += loss.detach()
        return total

    def _run_pipeline(self, micro_batches: list, train: bool) -> torch.Tensor:
        """One step of the pipeline schedule over this rank's micro-batches; the mean loss
        (only the last stage has one: summed over the pp group, identical on all pp ranks).

        With ``data.document_mask`` every stage needs its micro-batch's document positions and
        mask, but a stage receives only hidden states: they go in as keyword arguments, which
        torch's schedules split into micro-batches like the inputs and hand to every stage
        (every pp rank loads the same tokens, so each computes them itself)."""
        pipe, sl = self.pipeline, self.seq_slice
        x = torch.cat([b[0][:, sl] for b in micro_batches]).to(self.device)
        y = torch.cat([b[1][:, sl] for b in micro_batches]).to(self.device)
        inputs: tuple = (x,)
        keys = [self.token_keys(k, b[0].shape[0]) for k, b in enumerate(micro_batches)]
        if keys[0] is not None:  # split into micro-batches by the schedule, like the tokens
            inputs = (x, torch.cat(keys))
        kwargs: dict[str, torch.Tensor] = {}
        if self.eos_id is not None:
            pos, mask = self._document_inputs(torch.cat([b[0] for b in micro_batches]))
            kwargs = {"positions": pos, "attn_mask": mask}
        losses: list[torch.Tensor] = []
        run = pipe.schedule.step if train else pipe.schedule.eval
        first = inputs if pipe.has_first else ()
        run(*first, target=y if pipe.has_last else None, losses=losses, **kwargs)
        total = torch.zeros((), device=self.device)
        for loss in losses:
            total += loss.detach().float()
        dist.all_reduce(total, group=pipe.pp_group)
        return total

    @property
    def pipeline_group(self) -> Any:
        return self.pipeline.pp_group if self.pipeline is not None else None

    def loss_group(self) -> Any:
        return self.dims.submesh("dp_sp").get_group() if self.dims.world_size > 1 else None

    def global_loss(self, local: torch.Tensor) -> float:
        return all_reduce_mean(local.item(), self.loss_group())

    def items_per_step(self) -> int:
        return self.job.train.global_batch_size * self.job.train.seq_len

    def flops_per_step(self) -> FlopCount:
        """Matmul FLOPs of the global batch, causal attention at half cost; MoE: the routed
        ``top_k`` experts and the router (``MoEConfig`` from ``model_config``)."""
        t = self.job.train
        cfg = self.model_config()
        return gpt_step_flops(cfg, t.global_batch_size, t.seq_len, t.activation_checkpoint)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, val_loader: Any) -> dict:
        """Mean next-token loss over ``train.eval_batches`` global batches of the val split."""
        model.eval()
        val_loader.load_state_dict({"consumed_samples": 0})
        losses, vocab = [], self.job.model.vocab_size
        for _ in range(self.job.train.eval_batches):
            batch = val_loader.next_batch()
            with self._context():
                if self.pipeline is not None:
                    losses.append(self._run_pipeline(batch, train=False).item())
                    continue
                for k, (x, y) in enumerate(batch):
                    x, y, pos = self._local(x, y)
                    losses.append(self.loss(self._forward(model, k, x, pos), y, vocab).item())
        model.train()
        loss = all_reduce_mean(sum(losses) / len(losses), self.loss_group())
        out = {"val_loss": loss}
        per_byte = tokens_per_byte(read_meta(self.data_dir), "val")
        if per_byte is not None:  # comparable across tokenizers
            out["val_bits_per_byte"] = loss / math.log(2) * per_byte
        return out
