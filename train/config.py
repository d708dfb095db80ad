"""Typed configuration: the schema of every Lattice experiment.

The dataclasses here are the single source of truth (Meta Lingua / lightning-hydra-template
style): they are registered in Hydra's ConfigStore as ``base_config``, the YAML groups under
``configs/`` only hold differences, and ``load_config`` turns the composed OmegaConf tree back
into these typed objects. Unknown keys are rejected because the schema is a structured config.

The override keys (``train.steps``, ``parallel.tp``, ...) are the public interface: renaming
one is a breaking change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


@dataclass
class RunArgs:
    """Where and under which name a run writes its outputs."""

    name: str = "default"
    """Experiment name; also names the default run directory."""
    dir: str = "runs/${run.name}"
    """Run directory (config.yaml, metrics.jsonl, loss.png, checkpoints/). Deterministic, so
    every torchrun rank resolves the same folder; never put ``${now:}`` here under torchrun."""


@dataclass
class ModelArgs:
    """The model family; each family extends this with its own typed fields.

    ``configs/model/*.yaml`` select a family's schema (``train/families/``: ``GPTArgs``,
    ``MoEArgs``, ``DLRMArgs``, ``DMTArgs``) through their defaults list, so a field of another
    family (``model.n_experts`` on ``model=gpt_tiny``) is rejected with the family it belongs to.
    """

    name: str = "gpt"
    """Model family: ``gpt`` (Llama-style decoder), ``gpt_moe`` (its GRIN mixture-of-experts
    variant), ``dlrm`` (flat DLRM recommender) or ``dmt`` (disaggregated multi-tower). Chosen
    with the config group (``model=gpt_moe``), not by setting this field."""


@dataclass
class TrainArgs:
    """The optimisation loop."""

    steps: int = 300
    """Optimizer steps to run."""
    seed: int = 0
    """Seed of weights, data order and dropout: same seed, same run, whatever the layout."""
    global_batch_size: int = 32
    """Sequences per optimizer step, summed over all data-parallel ranks and micro-batches."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one data-parallel rank."""
    seq_len: int = 128
    """Tokens per sequence."""
    warmup_steps: int = 30
    """Linear warm-up steps before the cosine decay."""
    eval_every: int = 100
    """Validate every N steps (0 disables periodic validation; a final one always runs)."""
    eval_batches: int = 8
    """Global batches of the validation split per validation."""
    dtype: str = "fp32"
    """Compute dtype under autocast: ``fp32`` or ``bf16`` (weights and optimizer stay fp32)."""
    activation_checkpoint: bool = False
    """Recompute each transformer block in backward instead of storing its activations."""
    compile: bool = False
    """``torch.compile`` each transformer block."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one rank's accelerator, the denominator of the logged ``mfu``; 0 takes it
    from the table in ``train/flops.py`` by GPU name (on CPU, or an unlisted GPU, no MFU is
    logged: set it to get one)."""
    max_time_s: float = 0.0
    """Stop early after this many seconds of training (0 = no limit)."""


@dataclass
class OptimArgs:
    """AdamW with warm-up and cosine decay."""

    name: str = "adamw"
    """Optimizer; only ``adamw`` for now."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` at the end of the cosine."""
    weight_decay: float = 0.1
    """Decoupled weight decay (applied to matrices only, not norms)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    impl: str = "auto"
    """Kernel: ``auto`` (fused where supported, else foreach), ``fused``, ``foreach``,
    ``for_loop``, or ``apex_fused_adam`` (NVIDIA apex's FusedAdam; needs apex, docs/data.md)."""


@dataclass
class ParallelArgs:
    """Degrees of every parallel dimension; their product must equal the world size."""

    dp_replicate: int = 1
    """Replicated data parallelism (DDP); with dp_shard > 1 the replica groups of HSDP."""
    dp_shard: int = -1
    """Sharded data parallelism (FSDP2, ZeRO-3-like). -1: whatever the world size leaves."""
    tp: int = 1
    """Tensor parallelism (Megatron column/row)."""
    pp: int = 1
    """Pipeline stages."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: ``gpipe``, ``1f1b`` or ``interleaved_1f1b``."""
    pp_virtual: int = 1
    """Virtual stages per pipeline rank (interleaved schedule)."""
    pp_microbatches: int = 0
    """Pipeline micro-batches per step; 0 means global_batch / (micro_batch x dp)."""
    sp: int = 1
    """DeepSpeed-Ulysses sequence parallelism."""
    ep: int = 1
    """Expert parallelism (MoE models), borrowed from the dp_shard x sp ranks."""
    sequence_parallel_norms: bool = False
    """Megatron sequence parallelism of norms/dropout inside tensor-parallel regions."""
    allow_cross_host_tp: bool = False
    """Accept tensor-parallel groups that span hosts (slow; rejected by default)."""
    backend: str = "auto"
    """Process-group backend: ``auto`` (nccl with CUDA, gloo otherwise), ``gloo``, ``nccl``."""
    timeout_s: float = 600.0
    """Collective timeout: a dead or mismatched rank fails after this long instead of hanging."""
    hang_timeout_s: float = 300.0
    """Hang watchdog: a rank without progress for this long writes its threads' stacks to
    ``run.dir/hang/rank_N.txt``, names the rank that fell behind, and ends the job (exit 3).
    Below ``timeout_s``; 0 disables it. Single-process runs have no watchdog."""


@dataclass
class DataArgs:
    """Where tokens come from."""

    name: str = "stdlib"
    """``stdlib``: bytes of the Python standard library's source (no download);
    ``shards``: memory-mapped token shards written by ``python -m train.prepare``."""
    path: str = ""
    """Folder with ``train.bin``/``val.bin``/``meta.json`` (``shards``), or the cache folder of
    the ``stdlib`` corpus (empty = ``data_cache/stdlib`` under the current directory)."""
    max_bytes: int = 16_000_000
    """``stdlib`` only: cap on corpus bytes read (keeps preparation to seconds)."""
    val_fraction: float = 0.05
    """``stdlib`` only: share of files (chosen by a hash of their path) held out for validation."""
    document_mask: bool = False
    """Packed documents do not attend to each other and their positions restart at each one
    (the shards' ``meta.json`` must record ``eos_id``, as ``python -m train.prepare`` writes).
    Token models only; not with pipeline parallelism yet."""
    backend: str = "torch"
    """Loader backend: ``torch`` (in-process) or ``dali`` (NVIDIA DALI pipeline; needs the
    ``dali`` extra). Both yield identical batches (see docs/data.md)."""
    prefetch: int = 2
    """``dali``: batches the pipeline prepares ahead of the trainer (prefetch queue depth)."""
    loader_threads: int = 2
    """``dali``: worker processes reading samples (and DALI CPU threads)."""
    dali_device: str = "cpu"
    """``dali``: where the pipeline puts its outputs: ``cpu`` or ``gpu`` (GPU ``LOCAL_RANK``;
    needs CUDA; token shards only, the recommender path runs on CPU)."""
    # -- click data (``synthetic_clicks``, ``criteo``: data.path is the TSV file) --
    num_sparse: int = 16
    """``synthetic_clicks``: categorical features (Criteo: always 26)."""
    num_dense: int = 4
    """``synthetic_clicks``: dense features (Criteo: always 13)."""
    num_groups: int = 4
    """``synthetic_clicks``: planted interaction groups (equal size)."""
    cardinality: int = 32
    """``synthetic_clicks``: ids per categorical feature."""


@dataclass
class CheckpointArgs:
    """Saving and resuming."""

    enabled: bool = False
    """Save checkpoints."""
    every: int = 0
    """Save every N steps (0 = only at the end when enabled)."""
    keep_last: int = 2
    """Committed checkpoints to keep."""
    mode: str = "lazy_async"
    """``sync``, ``async`` or ``lazy_async``."""
    resume: str = "auto"
    """``auto``: with checkpointing on, the newest committed checkpoint of ``checkpoint.dir``
    if there is one, else a fresh start (one launch line serves the first start and every
    restart). ``latest``: that checkpoint, which must exist. A path: a step folder, a
    checkpoints folder, or its ``latest`` file. ``none`` (or empty): start fresh, refused when
    ``checkpoint.dir`` already holds checkpoints."""
    allow_model_change: list[str] = field(default_factory=list)
    """``model.*`` fields that may differ from the checkpoint's saved config on resume (e.g.
    ``[partition_warmup_steps]``); any other difference is refused, listing each field."""
    dir: str = ""
    """Folder of the step_* checkpoints and ``latest`` (empty = ``<run.dir>/checkpoints``)."""
    host_buffer_mb: int = 1024
    """Byte budget of the reusable host buffer the lazy snapshot copies into (a larger state
    streams through it; the copy then waits for the writer)."""


@dataclass
class OffloadArgs:
    """Optimizer-state offload."""

    kind: str = "none"
    """``none``, ``cpu`` (state in host memory, CPU updates), ``nvme`` (state in NVMe files)
    or ``interleaved`` (per-subgroup placement chosen by the calibrated performance model)."""
    nvme_path: str = ""
    """Folder on a local NVMe/SSD for the NVMe tier (needed by ``nvme`` and budget overflow)."""
    host_budget_mb: int = 0
    """Host memory the optimizer state may use (0 = unlimited); the rest goes to NVMe."""
    device_budget_mb: int = -1
    """``interleaved``: accelerator memory for resident state (-1 = 40% of free memory)."""
    subgroup_size: int = 4_194_304
    """Parameters per subgroup (the unit of placement, transfer and file I/O)."""
    placement: str = ""
    """Override: ``device``/``stage``/``cpu``/``nvme`` or a comma list cycled over subgroups."""
    cpu_kernel: str = "auto"
    """CPU AdamW kernel: ``auto`` (fastest measured), ``torch_fused``, ``ds_cpu_adam``, ..."""
    io_backend: str = "auto"
    """NVMe I/O: ``auto``, ``deepspeed`` (async_io), ``threads`` (O_DIRECT), ``buffered``."""
    calibration_cache: str = "~/.cache/lattice/offload_calibration.json"
    """JSON file caching the start-up measurements per machine (empty = always measure)."""


@dataclass
class LoggingArgs:
    """Metrics and progress output."""

    every: int = 10
    """Log a metrics line every N steps (always on the first and the last)."""
    progress: bool = True
    """Progress bar on rank 0 (loss, tokens/s, ETA)."""
    wandb: bool = False
    """Also log to Weights & Biases (offline mode unless WANDB_MODE says otherwise)."""
    wandb_project: str = "lattice"
    """W&B project name."""
    plot: bool = True
    """Write ``loss.png`` at the end."""


@dataclass
class JobConfig:
    """Root of an experiment; one field per config group."""

    run: RunArgs = field(default_factory=RunArgs)
    model: ModelArgs = field(default_factory=ModelArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    offload: OffloadArgs = field(default_factory=OffloadArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)


def register_configs(model_schemas: dict[str, type] | None = None) -> None:
    """Register the schema in Hydra's ConfigStore: ``base_config``, and each model family's
    args as ``model/<family>_schema`` (selected by the defaults list of ``configs/model/*``)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=JobConfig)
    for family, schema in (model_schemas or {}).items():
        cs.store(group="model", name=f"{family}_schema", node=schema)
