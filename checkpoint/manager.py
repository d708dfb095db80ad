"""``checkpoint.Manager``: what the trainer calls to save (lazily) and to resume on any layout.

Owns the save protocol (which rank writes which chunk, the commit on a dedicated gloo group,
``latest``, retention) and the universal load (read of overlapping chunks into whatever DTensor
layout the current run has, vocabulary re-padding, optimizer/scheduler/data/RNG restore).

Built on torch.distributed.checkpoint's ``get_model_state_dict`` / ``get_optimizer_state_dict`` /
``set_*``: they give every tensor under its canonical FQN (wrapper prefixes removed), map
optimizer state to parameter names, and initialise empty optimizer state before a load. The
chunk geometry comes from DTensor (``compute_local_shape_and_global_offset``), so any layout
expressed as placements on a named mesh (FSDP2, HSDP, TP, EP, Ulysses) saves and loads without
code here knowing it. Universal Checkpointing (Lian et al., 2024) is the model for the logical
metadata; DataStates-LLM for the lazy engine (``checkpoint/engine.py``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from checkpoint.adapter import CheckpointAdapter
from checkpoint.engine import SaveJob, SnapshotEngine, WriteItem, pause_point
from checkpoint.format import (
    FORMAT,
    FRESH,
    INDEX,
    LATEST,
    VERSION,
    CheckpointError,
    Chunk,
    TensorMeta,
    align,
    atomic_write,
    box_slices,
    committed_steps,
    decode_tensor,
    dtype_from_name,
    dtype_name,
    encode_tensor,
    fsync_dir,
    has_checkpoints,
    json_bytes,
    names_checkpoint,
    newest_clean_before,
    overlap,
    read_index,
    resolve,
    sha256_file,
    step_dir_name,
    verify_files,
)

MODES = ("sync", "async", "lazy_async")


# -- what a rank holds ------------------------------------------------------------------------
class LocalChunk:
    """This rank's piece of one logical tensor: live tensor view + its box in logical coords."""

    def __init__(self, name: str, local: torch.Tensor, offset: list[int], meta: TensorMeta) -> None:
        self.name, self.local, self.offset, self.meta = name, local, offset, meta
        self.storage = local  # this rank's whole local tensor, padding rows included

    @property
    def shape(self) -> list[int]:
        return list(self.local.shape)


def _mesh_dims(t: DTensor) -> list[str]:
    names = t.device_mesh.mesh_dim_names
    return list(names) if names else [f"dim{i}" for i in range(t.device_mesh.ndim)]


def local_chunks(
    state: dict[str, Any], prefix: str, adapter: CheckpointAdapter | None = None
) -> list[LocalChunk]:
    """Flatten a (nested) state dict of tensors into this rank's chunks in logical coordinates.

    Args:
        state: ``{fqn: tensor}`` or ``{fqn: {key: tensor}}`` (optimizer state).
        prefix: ``"model"`` or ``"optim"``; names become ``prefix/logical_fqn[/key]``.
        adapter: the family's logical metadata (names, vocabulary padding, experts, tables).
    """
    adapter = adapter or CheckpointAdapter()
    out = []
    for local_fqn, value in state.items():
        fqn = adapter.logical_name(local_fqn)
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, t in items:
            if not isinstance(t, torch.Tensor):
                continue
            name = f"{prefix}/{fqn}" + (f"/{key}" if key is not None else "")
            part: dict[str, Any] = {"padding": None, "expert": None, "fused": None}
            if isinstance(t, DTensor):
                shape, offset = compute_local_shape_and_global_offset(
                    t.shape, t.device_mesh, t.placements
                )
                local = t.to_local()
                if list(local.shape) != list(shape):  # padded local storage (uneven shards)
                    local = local[tuple(slice(0, s) for s in shape)]
                part.update(placements=[str(p) for p in t.placements], mesh_dims=_mesh_dims(t))
                part["mesh_shape"] = list(t.device_mesh.shape)
                global_shape = list(t.shape)
            else:
                local, offset, global_shape = t, [0] * t.ndim, list(t.shape)
                part.update(placements=[], mesh_dims=[])
            logical = list(global_shape)
            storage = local
            pad = adapter.padding.get(fqn)
            if pad is not None and t.ndim > pad[0] and global_shape[pad[0]] > pad[1]:
                d, size = pad
                part["padding"] = {"dim": d, "padded_size": global_shape[d]}
                logical[d] = size
                keep = max(0, min(local.shape[d], size - offset[d]))
                local = local.narrow(d, 0, keep)
            part.update(adapter.part(fqn, t.ndim))
            if part["expert"] is not None:  # (E, ...) stacks, EP-sharded on dim 0
                part["expert"]["num_experts"] = logical[0]
            meta = TensorMeta(name, logical, dtype_name(t.dtype), part)
            chunk = LocalChunk(name, local.detach(), list(offset), meta)
            chunk.storage = storage.detach()
            out.append(chunk)
    return out


def _rng_state() -> dict:
    state = {
        "torch": encode_tensor(torch.get_rng_state()),
        "python": json.loads(json.dumps(random.getstate(), default=list)),
        "numpy": None,
    }
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = [encode_tensor(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(decode_tensor(state["torch"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode_tensor(s) for s in state["cuda"]])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# -- the manager ------------------------------------------------------------------------------
def _local_numel(p: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def _latest_step(root: Path) -> int | None:
    """Step of the checkpoint ``root/latest`` resolves to, or None when there is none."""
    try:
        return int(resolve(root, "latest").name.removeprefix("step_"))
    except (CheckpointError, ValueError, OSError):
        return None


def model_config_diff(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` for every ``model.*`` field (nested keys
    dotted) whose value differs between a saved config and the current one."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += model_config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def earlier_valid_hint(ckpt: Path) -> str:
    """``"; the newest valid earlier checkpoint is ...: resume with ..."``, found by verifying
    every file of the earlier committed steps beside ``ckpt`` (newest first)."""
    older = newest_clean_before(ckpt)
    if older is None:
        return f"; no earlier valid checkpoint is in {ckpt.parent}"
    return (
        f"; the newest valid earlier checkpoint is {older}: resume from it with "
        f"checkpoint.resume={older}"
    )


class Manager:
    """Checkpoint saving and resuming for one rank of a run.

    Call order in a training loop::

        ckpt = Manager(job.checkpoint, run_dir, config=cfg_dict)
        step = ckpt.maybe_resume(model, optimizer, scheduler, train_loader)
        loop: forward/backward; ckpt.wait_before_update(); optimizer.step(); ...
              ckpt.save_async(step)         # when ckpt.due(step)
        ckpt.finalize()
    """

    def __init__(
        self,
        args: Any,
        run_dir: Path | str,
        config: dict | None = None,
        layout: dict | None = None,
    ) -> None:
        if args.mode not in MODES:
            raise CheckpointError(f"checkpoint.mode={args.mode!r}: use one of {', '.join(MODES)}")
        self.args = args
        self.root = Path(getattr(args, "dir", "") or Path(run_dir) / "checkpoints")
        self.config = config or {}
        self.layout = layout or {}
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # Writes, fsync and the commit talk over their own gloo group so that they never
        # interleave with the training collectives (NCCL or gloo) of the main thread.
        active = args.enabled or names_checkpoint(args.resume)
        self.group = dist.new_group(backend="gloo") if self.world > 1 and active else None
        budget = int(getattr(args, "host_buffer_mb", 1024)) << 20
        self.engine = SnapshotEngine(budget, pin=torch.cuda.is_available())
        self.job: SaveJob | None = None
        self.model = self.optimizer = self.scheduler = self.loader = None
        self.adapter, self.extra = CheckpointAdapter(), None
        self.rng: torch.Generator | None = None
        self._writer_plan: dict[tuple, int] | None = None
        self._chunk_cache: tuple[tuple, list[LocalChunk]] | None = None
        # A restarted run's errors name the checkpoint `latest` still points at.
        self.last_committed: int | None = _latest_step(self.root)
        self.last_saved: int | None = None
        self.stats: list[dict] = []
        self._lock = threading.Lock()
        self._target: tuple[Path | None] | None = None
        # This run's identity, written into every index it commits; adopted from the
        # checkpoint on resume. Retention deletes only checkpoints of this run.
        self.run_id = uuid.uuid4().hex

    # -- attach / resume ----------------------------------------------------------------------
    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        train_loader: Any = None,
        rng: torch.Generator | None = None,
        adapter: CheckpointAdapter | None = None,
        extra: Any = None,
    ) -> None:
        """Attach the training objects. ``adapter``: the family's tensor metadata; ``extra``:
        a ``state_dict``/``load_state_dict`` object whose (JSON) state rides in train_state."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loader, self.rng = train_loader, rng
        self.adapter, self.extra = adapter or CheckpointAdapter(), extra
        if self.args.enabled and self.args.mode != "sync":
            # Parameters + Adam's two moments: the usual size of this rank's shard.
            local = sum(_local_numel(p) * p.element_size() for p in model.parameters())
            self.engine.reserve(3 * local)

    def maybe_resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        train_loader: Any = None,
        rng: torch.Generator | None = None,
        adapter: CheckpointAdapter | None = None,
        extra: Any = None,
    ) -> int:
        """Attach the training objects; load what ``checkpoint.resume`` names, if anything.
        Returns the step (0 on a fresh start)."""
        self.attach(model, optimizer, scheduler, train_loader, rng, adapter, extra)
        ckpt = self.resume_target()
        if ckpt is None:
            return 0
        return self.load(ckpt)

    def resume_target(self) -> Path | None:
        """The checkpoint this run resumes from, or None for a fresh start (resolved once).

        ``auto`` resumes from ``latest`` when checkpointing is on and the checkpoint folder
        holds one; a fresh start (``none``) into a folder that holds checkpoints is refused,
        since its retention and ``latest`` would mix with theirs."""
        if self._target is None:
            self._target = (self._resolve_target(),)
        return self._target[0]

    def _resolve_target(self) -> Path | None:
        spec, root = self.args.resume, self.root
        if spec == "auto":
            return resolve(root, "latest") if self.args.enabled and has_checkpoints(root) else None
        if spec in FRESH:
            if self.args.enabled and has_checkpoints(root):
                newest = committed_steps(root)
                raise CheckpointError(
                    f"checkpoint.resume={spec or 'none'} starts fresh, but {root} already holds "
                    f"checkpoints ({newest[-1].name if newest else 'a latest file'}) of a "
                    f"run: resume it with checkpoint.resume=auto, or give this run its own "
                    f"run.dir or checkpoint.dir"
                )
            return None
        return resolve(root, spec)

    def saved_extra(self) -> Any:
        """The family's extra state in the checkpoint this run resumes from (None when not
        resuming), read before the model exists: a family whose structure is state (DMT's
        tower plan) builds from it. An unreadable file gives None here; ``load`` then names it
        after verifying every file's hash."""
        ckpt = self.resume_target()
        if ckpt is None:
            return None
        try:
            index = read_index(ckpt)
            return json.loads((ckpt / index["train_state"]).read_text()).get("extra")
        except (CheckpointError, OSError, ValueError, KeyError):
            return None

    def due(self, step: int, final: bool = False) -> bool:
        if not self.args.enabled:
            return False
        every = self.args.every
        return final or (every > 0 and step % every == 0)

    # -- save ---------------------------------------------------------------------------------
    def _state(self) -> tuple[dict, dict]:
        msd = get_model_state_dict(self.model)
        osd = get_optimizer_state_dict(self.model, self.optimizer)
        return msd, osd

    def _chunks(self) -> list[LocalChunk]:
        """This rank's chunks, as views of the live tensors.

        DCP's state-dict functions cost tens of milliseconds on the training thread, so their
        result is reused while the same tensors (same storage, same sizes) hold the state:
        the cached chunks are views of that storage, so they see the current values. Only
        optimizers that keep their state as tensors in ``optimizer.state`` (torch's) qualify;
        others (offload tiers) may hand out copies and are asked every time."""
        fp = self._fingerprint()
        cached = self._chunk_cache
        if fp is not None and cached is not None and cached[0] == fp:
            return cached[1]
        msd, osd = self._state()
        chunks = local_chunks(msd, "model", self.adapter) + local_chunks(
            osd["state"], "optim", self.adapter
        )
        live = {ptr for ptr, _ in fp or ()}
        aliased = all(c.local.untyped_storage().data_ptr() in live for c in chunks)
        self._chunk_cache = (fp, chunks) if fp is not None and aliased else None
        return chunks

    def _fingerprint(self) -> tuple | None:
        """(storage pointer, bytes) of every tensor the state dict is made of, or None when
        the optimizer does not hold its state as plain tensors (then nothing is cached)."""
        if type(self.optimizer).state_dict is not torch.optim.Optimizer.state_dict:
            return None
        ts = [*self.model.parameters(), *self.model.buffers()]
        ts += [v for st in self.optimizer.state.values() for v in st.values()]
        out = []
        for t in ts:
            if isinstance(t, torch.Tensor):
                local = t.to_local() if isinstance(t, DTensor) else t
                out.append((local.untyped_storage().data_ptr(), local.untyped_storage().nbytes()))
        return tuple(out)

    def _plan_writers(self, chunks: list[LocalChunk]) -> dict[tuple, int]:
        """Each distinct (name, box) is written once, by the lowest rank that holds it."""
        keys = [(c.name, tuple(c.offset), tuple(c.shape)) for c in chunks if c.local.numel()]
        if self._writer_plan is not None and set(keys) <= self._writer_plan.keys():
            return self._writer_plan
        gathered = [keys]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, keys, group=self.group)
        plan: dict[tuple, int] = {}
        for r, ks in enumerate(gathered):
            for k in ks:
                plan.setdefault(k, r)
        self._writer_plan = plan
        return plan

    def save_async(self, step: int) -> None:
        """Register a checkpoint of the current state at ``step``.

        ``lazy_async`` returns at once (the copy overlaps the next forward/backward);
        ``async`` returns once the host copy is done; ``sync`` once the checkpoint is committed.
        Every rank must call it at the same step.
        """
        if self.model is None:
            raise CheckpointError("Manager.save_async before maybe_resume/attach")
        self.wait()  # at most one checkpoint in flight
        chunks = self._chunks()
        step_dir = self.root / step_dir_name(step)
        if (step_dir / INDEX).exists() and not self._own(step_dir):
            raise CheckpointError(
                f"{step_dir} is a committed checkpoint of another run: refusing to overwrite "
                f"it; give this run its own checkpoint.dir (or run.dir)"
            )
        shard_rel = f"shards/rank_{self.rank:05d}.bin"
        items, metas, nbytes = self._layout_shard(chunks, self._plan_writers(chunks), shard_rel)
        # Small host state is captured now (it changes in the next step).
        rank_state = {"rank": self.rank, "rng": _rng_state()}
        if self.rng is not None:
            rank_state["generator"] = encode_tensor(self.rng.get_state())
        train_state = self._train_state(step) if self.rank == 0 else None
        ctx = {
            "step_dir": step_dir,
            "shard_rel": shard_rel,
            "metas": metas,
            "rank_state": rank_state,
            "train_state": train_state,
        }
        job = SaveJob(
            step,
            step_dir / shard_rel,
            items,
            nbytes,
            commit_fn=lambda j: self._commit(j, ctx),
            prepare_fn=lambda j: self._prepare(j, ctx),
        )
        self.job = job
        self.last_saved = step
        mode = self.args.mode
        self.engine.start(job, lazy=mode == "lazy_async")
        if mode == "sync":
            self.wait()

    def _layout_shard(
        self, chunks: list[LocalChunk], plan: dict[tuple, int], shard_rel: str
    ) -> tuple[list[WriteItem], list[TensorMeta], int]:
        """The chunks this rank writes, at aligned offsets of its shard file: (write items,
        their index entries, the file's size)."""
        items, metas, pos = [], [], 0
        for c in chunks:
            key = (c.name, tuple(c.offset), tuple(c.shape))
            if not c.local.numel() or plan.get(key) != self.rank:
                continue
            local = c.local if c.local.is_contiguous() else c.local.contiguous()
            nbytes = local.numel() * local.element_size()
            pos = align(pos)
            items.append(WriteItem(local, pos, nbytes))
            c.meta.chunks = [Chunk(shard_rel, pos, nbytes, c.offset, c.shape)]
            metas.append(c.meta)
            pos += nbytes
        return items, metas, align(pos)

    def _train_state(self, step: int) -> dict:
        """Rank 0's small state: step, scheduler, data position, the family's extra state,
        optimizer hyper-parameters, world size, layout and config."""
        groups = [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        return {
            "step": step,
            "scheduler": _jsonable(self.scheduler.state_dict()) if self.scheduler else None,
            "data": _jsonable(self.loader.state_dict()) if self.loader else None,
            "extra": _jsonable(self.extra.state_dict()) if self.extra is not None else None,
            "param_groups": _jsonable(groups),
            "world_size": self.world,
            "layout": self.layout,
            "config": self.config,
        }

    def _prepare(self, job: SaveJob, ctx: dict) -> None:
        """Writer thread, before the first byte: rank 0 clears a stale dir of the same step."""
        step_dir: Path = ctx["step_dir"]
        if self.rank == 0 and step_dir.exists():
            (step_dir / INDEX).unlink(missing_ok=True)  # uncommit first, then clear
            shutil.rmtree(step_dir, ignore_errors=True)
        if self.group is not None:
            dist.barrier(group=self.group)
        step_dir.mkdir(parents=True, exist_ok=True)

    def _commit(self, job: SaveJob, ctx: dict) -> None:
        """Writer thread: small files, gather chunk metadata + hashes, rank 0 commits."""
        step_dir: Path = ctx["step_dir"]
        files: dict[str, dict] = {}
        error = str(job.error) if job.error is not None else None
        if error is None:
            try:
                files[ctx["shard_rel"]] = {"sha256": job.sha256, "bytes": job.file_bytes}
                rel = f"train_state/rank_{self.rank:05d}.json"
                self._write_small(step_dir, rel, json_bytes(ctx["rank_state"]), files)
                if ctx["train_state"] is not None:
                    self._write_small(
                        step_dir, "train_state.json", json_bytes(ctx["train_state"]), files
                    )
            except OSError as e:
                error = f"writing small files in {step_dir} failed: {e}"
        payload = {
            "rank": self.rank,
            "error": error,
            "files": files,
            "tensors": [(m.name, m.to_json()) for m in ctx["metas"]],
        }
        gathered = [payload]
        if self.group is not None:
            gathered = [None] * self.world if self.rank == 0 else None
            dist.gather_object(payload, gathered, dst=0, group=self.group)
        status = {"ok": True, "error": None}
        if self.rank == 0:
            errors = [f"rank {p['rank']}: {p['error']}" for p in gathered if p["error"]]
            if errors:
                status = {"ok": False, "error": "; ".join(errors)}
            else:
                try:
                    self._write_index(job.step, step_dir, gathered)
                except OSError as e:
                    status = {"ok": False, "error": f"committing {step_dir / INDEX} failed: {e}"}
        if self.group is not None:
            box = [status]
            dist.broadcast_object_list(box, src=0, group=self.group)
            status = box[0]
        if not status["ok"]:
            prev = self.last_committed
            raise CheckpointError(
                f"checkpoint of step {job.step} was NOT committed ({status['error']}); "
                f"the previous checkpoint ({'step ' + str(prev) if prev is not None else 'none'}) "
                f"is kept and `latest` still names it"
            )
        self.last_committed = job.step

    def _write_small(self, step_dir: Path, rel: str, data: bytes, files: dict) -> None:
        path = step_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        files[rel] = {"sha256": sha256_file(path), "bytes": len(data)}

    def _write_index(self, step: int, step_dir: Path, payloads: list[dict]) -> None:
        tensors: dict[str, TensorMeta] = {}
        manifest: dict[str, dict] = {}
        for p in payloads:
            manifest.update(p["files"])
            for name, d in p["tensors"]:
                meta = TensorMeta.from_json(name, d)
                if name in tensors:
                    tensors[name].chunks.extend(meta.chunks)
                else:
                    tensors[name] = meta
        for d in (step_dir / "shards", step_dir / "train_state", step_dir):
            if d.exists():
                fsync_dir(d)
        index = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "world_size": self.world,
            "layout": self.layout,
            "run_id": self.run_id,
            "train_state": "train_state.json",
            "tensors": {n: tensors[n].to_json() for n in sorted(tensors)},
            "manifest": dict(sorted(manifest.items())),
        }
        pause_point(self.engine.writer, "before_index")
        atomic_write(step_dir / INDEX, json_bytes(index))  # the commit point
        pause_point(self.engine.writer, "before_latest")
        atomic_write(self.root / LATEST, (step_dir.name + "\n").encode())
        self._retain(step_dir)

    def _own(self, step_dir: Path) -> bool:
        """Whether ``step_dir`` was committed by this run (its index names our run id)."""
        try:
            return json.loads((step_dir / INDEX).read_text()).get("run_id") == self.run_id
        except (OSError, ValueError):
            return False

    def _retain(self, current: Path) -> None:
        """Keep the newest ``keep_last`` checkpoints of this run; never touch another run's."""
        keep = self.args.keep_last
        if keep <= 0:
            return
        committed = [p for p in committed_steps(self.root) if self._own(p)]
        for old in committed[:-keep]:
            if old != current:
                (old / INDEX).unlink(missing_ok=True)  # uncommit before deleting
                shutil.rmtree(old, ignore_errors=True)

    def wait_before_update(self) -> None:
        """Block until the in-flight snapshot's host copy is complete (call before the update)."""
        job = self.job
        if job is None:
            return
        job.copy_done.wait()
        if job.error is not None and job.done.is_set():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight checkpoint is committed (or failed: raises)."""
        job = self.job
        if job is None:
            return
        job.done.wait()
        self.job = None
        self.stats.append({"step": job.step, "copy_s": job.copy_s, "durable_s": job.durable_s})
        if job.error is not None:
            if isinstance(job.error, CheckpointError):
                raise job.error
            raise CheckpointError(
                f"checkpoint of step {job.step} failed: {job.error!r}"
            ) from job.error

    def finalize(self) -> None:
        """Flush: wait for the in-flight checkpoint's commit (call at exit on every rank)."""
        try:
            self.wait()
        finally:
            self.engine.join()  # no checkpoint thread may outlive the trainer

    # -- load ---------------------------------------------------------------------------------
    def load(self, ckpt: Path) -> int:
        """Load ``ckpt`` into the attached objects on the current layout; returns its step.

        Phases: read the index; match this rank's chunks to the saved ones; verify the bytes
        of every file to be read; only then fill the live tensors and restore the small state.
        Every rank raises together on a problem found before the fill (nothing half-loaded)."""
        ckpt = Path(ckpt)
        index = self._read_index(ckpt)
        msd, osd = self._state()
        targets = local_chunks(msd, "model", self.adapter)
        targets += local_chunks(osd["state"], "optim", self.adapter)
        reads, error = self._match_chunks(ckpt, index, targets)
        if error is None:
            error = self._verify(ckpt, index, reads)
            if error is not None:
                error += earlier_valid_hint(ckpt)
        self._agree(error)
        state = json.loads((ckpt / index["train_state"]).read_text())  # verified above
        self._agree(self._incompatible(ckpt, index, state, targets))
        self._fill(ckpt, targets, reads)  # nothing below can fail on data
        set_model_state_dict(self.model, msd)
        self._restore_optimizer(osd, state)
        self._restore_train_state(ckpt, index, state)
        self.last_committed = int(index["step"])
        self.run_id = index.get("run_id") or self.run_id
        if self.rank == 0:
            print(
                f"resuming at step {state['step']} from {ckpt} (saved on layout "
                f"{index.get('layout')}, world size {index.get('world_size')}; now world size "
                f"{self.world})",
                flush=True,
            )
        return int(state["step"])

    def _read_index(self, ckpt: Path) -> dict:
        error, index = None, None
        try:
            index = read_index(ckpt)
        except CheckpointError as e:
            error = str(e) + earlier_valid_hint(ckpt)
        self._agree(error)
        return index

    def _incompatible(
        self, ckpt: Path, index: dict, state: dict, targets: list[LocalChunk]
    ) -> str | None:
        """Why this checkpoint would silently change the model, or None: a ``model.*`` field
        of its saved config differs from the current one (outside ``allow_model_change``), or
        it holds tensors that no rank of the current model has."""
        allowed = {k.removeprefix("model.") for k in getattr(self.args, "allow_model_change", [])}
        saved, now = (state.get("config") or {}).get("model"), self.config.get("model")
        if saved is not None and now is not None:
            diffs = [d for d in model_config_diff(saved, now) if d[0] not in allowed]
            if diffs:
                listed = "; ".join(f"model.{k}: saved {a!r}, now {b!r}" for k, a, b in diffs)
                names = ",".join(k for k, _, _ in diffs)
                return (
                    f"{ckpt} was saved with a different model ({listed}): resume with the saved "
                    f"values, or allow the change deliberately with "
                    f"checkpoint.allow_model_change=[{names}]"
                )
        names = {t.name for t in targets}
        if self.group is not None:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, sorted(names), group=self.group)
            names = set().union(*map(set, gathered))
        extra = sorted(set(index["tensors"]) - names)
        if extra:
            shown = ", ".join(extra[:6]) + (f" and {len(extra) - 6} more" if len(extra) > 6 else "")
            return (
                f"{ckpt} holds {len(extra)} tensors the current model does not have ({shown}): "
                f"loading would drop them silently; resume with the model the checkpoint was "
                f"saved with"
            )
        return None

    @staticmethod
    def _match_chunks(
        ckpt: Path, index: dict, targets: list[LocalChunk]
    ) -> tuple[list[tuple[LocalChunk, Chunk, TensorMeta]], str | None]:
        """The saved chunks overlapping each of this rank's chunks, or the first mismatch."""
        reads: list[tuple[LocalChunk, Chunk, TensorMeta]] = []
        error = None
        for t in targets:
            meta = index["tensors"].get(t.name)
            if meta is None:
                error = error or (
                    f"{ckpt}/{INDEX} has no tensor {t.name!r} (saved by a different model?)"
                )
                continue
            m = TensorMeta.from_json(t.name, meta)
            if m.logical_shape != t.meta.logical_shape:
                error = error or (
                    f"{t.name}: checkpoint logical shape {m.logical_shape} != model "
                    f"{t.meta.logical_shape} (different model.* config?)"
                )
            for c in m.chunks:
                if overlap(c.offset, c.shape, t.offset, t.shape) is not None:
                    reads.append((t, c, m))
        return reads, error

    def _rank_rel(self) -> str:
        return f"train_state/rank_{self.rank:05d}.json"

    def _verify(self, ckpt: Path, index: dict, reads: list) -> str | None:
        """Hash every file this rank reads, before touching the model."""
        files = {c.file for _, c, _ in reads} | {index["train_state"]}
        if self._rank_rel() in index["manifest"]:
            files.add(self._rank_rel())
        try:
            verify_files(ckpt, index, files)
        except CheckpointError as e:
            return str(e)
        return None

    @staticmethod
    @torch.no_grad()
    def _fill(ckpt: Path, targets: list[LocalChunk], reads: list) -> None:
        """Copy the overlapping boxes of the saved chunks into the live tensors."""
        mmaps: dict[str, np.memmap] = {}
        for t in targets:
            if t.meta.partitioning.get("padding") is not None:
                t.storage.zero_()  # re-pad: rows beyond the logical vocabulary start at zero
        for t, c, m in reads:
            mm = mmaps.get(c.file)
            if mm is None:
                mm = mmaps[c.file] = np.memmap(ckpt / c.file, dtype=np.uint8, mode="r")
            raw = torch.from_numpy(np.array(mm[c.byte_offset : c.byte_offset + c.nbytes]))
            src = raw.view(dtype_from_name(m.dtype)).reshape(c.shape)
            off, shape = overlap(c.offset, c.shape, t.offset, t.shape)
            t.local[box_slices(off, shape, t.offset)].copy_(src[box_slices(off, shape, c.offset)])

    def _restore_optimizer(self, osd: dict, state: dict) -> None:
        saved_groups = state.get("param_groups") or []
        for g, saved in zip(osd["param_groups"], saved_groups):
            for k, v in saved.items():
                g[k] = tuple(v) if isinstance(g.get(k), tuple) else v
        set_optimizer_state_dict(self.model, self.optimizer, osd)

    def _restore_train_state(self, ckpt: Path, index: dict, state: dict) -> None:
        """Scheduler, data position, the family's extra state and (same world size) RNG."""
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.loader is not None and state.get("data") is not None:
            self.loader.load_state_dict(state["data"])
        if self.extra is not None and state.get("extra") is not None:
            self.extra.load_state_dict(state["extra"])
        rank_rel = self._rank_rel()
        if rank_rel in index["manifest"] and state.get("world_size") == self.world:
            rank_state = json.loads((ckpt / rank_rel).read_text())
            _set_rng_state(rank_state["rng"])
            if self.rng is not None and "generator" in rank_state:
                self.rng.set_state(decode_tensor(rank_state["generator"]))
        elif state.get("world_size") != self.world:
            warnings.warn(
                f"resuming {ckpt} (world size {state.get('world_size')}) on world size "
                f"{self.world}: per-rank RNG streams are not restored",
                stacklevel=3,
            )

    def _agree(self, error: str | None) -> None:
        """Every rank raises together if any rank found a problem (nothing half-loaded)."""
        errors = [error]
        if self.group is not None:
            errors = [None] * self.world
            dist.all_gather_object(errors, error, group=self.group)
        first = next((e for e in errors if e), None)
        if first:
            raise CheckpointError(first)
